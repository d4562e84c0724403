"""``dicomweb+http(s)://HOST[:PORT]/PATH``: the DICOMweb base URL of a scan source or target."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from osteoscan.errors import UsageError
from osteoscan.pacs import SCHEME_PREFIX


@dataclass(frozen=True)
class ServerUrl:
    """A parsed DICOMweb URL. ``base`` is the plain HTTP(S) URL the client uses."""

    base: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> ServerUrl:
        """Parse ``dicomweb+http(s)://HOST[:PORT]/PATH``; refuses credentials in the URL."""
        raw = str(text).strip()
        if not raw.startswith(SCHEME_PREFIX):
            raise UsageError(f"not a DICOMweb URL (dicomweb+http://HOST:PORT/PATH): {raw}")
        parts = urlsplit(raw[len(SCHEME_PREFIX) :])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError("a DICOMweb URL looks like dicomweb+http://HOST:PORT/dicom-web")
        if parts.username or parts.password:
            # the command line shows up in `ps`, shell history and cron mails
            raise UsageError(
                "credentials must not be part of the URL: put them in ~/.netrc (HTTP basic) "
                "or OSTEOSCAN_DICOMWEB_TOKEN (bearer token)"
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError("the port of a DICOMweb URL must be a number") from exc
        netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + ("" if port is None else f":{port}")
        base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
        return cls(base=base, host=parts.hostname, port=port)

    @property
    def shown(self) -> str:
        """The URL as messages show it (it never holds credentials)."""
        return SCHEME_PREFIX + self.base

    def __str__(self) -> str:
        return self.shown
