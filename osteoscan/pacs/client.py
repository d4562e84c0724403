"""QIDO-RS, WADO-RS and STOW-RS through ``dicomweb-client``, with osteoscan's failure rules.

- Server unreachable when the run starts (:meth:`PacsClient.check`): :class:`PacsUnreachable`,
  exit 1, the message names the URL (which never holds credentials).
- HTTP 401/403, at any time: :class:`AuthFailed`, exit 1 ("authentication failed").
- A 5xx, 408/429, a timeout or a dropped connection on one request: retried with exponential
  backoff; after the last attempt :class:`RequestFailed` carries the HTTP status (or
  ``timeout``), and the caller turns it into an ``error`` row that the next run retries.

Messages are built from status codes and exception *types* only: a server's error page or a
``requests`` exception text could echo a URL or header, so neither is copied into a message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import requests
from pydicom.dataset import Dataset

from osteoscan.errors import OsteoscanError
from osteoscan.pacs.auth import TOKEN_ENV, netrc_path, session_for
from osteoscan.pacs.url import ServerUrl

T = TypeVar("T")
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
PAGE = 1000  # QIDO-RS results asked for at once (servers may cap it lower: we page on)
# dicomweb-client's retry helper logs a traceback per failed attempt at WARNING; our own
# loop reports failures as rows and messages, so keep that noise out of nightly logs
logging.getLogger("retrying").setLevel(logging.ERROR)


class PacsUnreachable(OsteoscanError):
    """The DICOMweb server does not answer (exit 1)."""


class AuthFailed(OsteoscanError):
    """The DICOMweb server refused our credentials (exit 1)."""


class RequestFailed(Exception):
    """One request failed for good: ``status`` is the HTTP status, or None for a timeout or a
    dropped connection; ``detail`` is a short text for the row's reason."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _why(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status or None, a short description) of a failed request, without its text."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        return code, f"HTTP {code} {exc.response.reason or ''}".strip()
    if isinstance(exc, requests.Timeout):
        return None, "timeout"
    if isinstance(exc, requests.ConnectionError):
        return None, "connection failed"
    return None, type(exc).__name__


class PacsClient:
    """One DICOMweb server. ``timeout``: (connect, read) seconds per request; ``attempts`` per
    request with ``backoff_s`` doubling between them."""

    def __init__(
        self,
        url: ServerUrl,
        *,
        timeout: tuple[float, float] = (10.0, 120.0),
        attempts: int = 4,
        backoff_s: float = 2.0,
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url
        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        self._client = DICOMwebClient(url.base, session=session_for(url), timeout=timeout)
        self._client.set_http_retry_params(retry=False)  # our own loop below, for all errors

    def _auth_failed(self, status: int) -> AuthFailed:
        return AuthFailed(
            f"authentication failed at {self.url} (HTTP {status}): check the entry for "
            f"{self.url.host} in {netrc_path()} or the {TOKEN_ENV} variable"
        )

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` with retries on transient failures (see the module docstring)."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except (requests.RequestException, OSError) as exc:
                status, detail = _why(exc)
                if status in (401, 403):
                    raise self._auth_failed(status) from None
                transient = status is None or status in RETRIABLE_STATUS
                if not transient or attempt == self.attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise RequestFailed(status, f"{what}: {detail}{tries}") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def check(self) -> None:
        """One small QIDO-RS request: raise :class:`PacsUnreachable` / :class:`AuthFailed`."""
        attempts, self.attempts = self.attempts, min(self.attempts, 2)  # fail fast at start
        try:
            self._call(lambda: self._client.search_for_studies(limit=1), "study search")
        except RequestFailed as exc:
            raise PacsUnreachable(
                f"cannot reach the DICOMweb server {self.url}: {exc.detail}; nothing was "
                "scanned - check the URL and that the server is running"
            ) from None
        finally:
            self.attempts = attempts

    def check_auth(self) -> None:
        """Raise :class:`AuthFailed` when the server refuses our credentials; a server that
        does not answer is no error here (what is to be stored waits for the next run)."""
        with contextlib.suppress(PacsUnreachable):
            self.check()

    def search_instances(
        self, filters: Mapping[str, str], fields: Sequence[str]
    ) -> list[dict[str, Any]]:
        """QIDO-RS ``/instances`` with ``filters``, asking for ``fields``, all pages."""

        def page(offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_instances(
                search_filters=dict(filters), fields=list(fields), limit=PAGE, offset=offset
            )

        out: list[dict[str, Any]] = []
        while True:
            got = self._call(lambda: page(len(out)), "instance search")
            if not got:  # a server may cap a page below PAGE: only an empty page ends it
                return out
            out.extend(got)

    def retrieve(self, study: str, series: str, instance: str) -> Dataset:
        """WADO-RS one instance, in the transfer syntax it is stored in."""
        return self._call(
            lambda: self._client.retrieve_instance(study, series, instance), "retrieval"
        )

    def store(self, datasets: Sequence[Dataset]) -> None:
        """STOW-RS ``datasets`` (one request); raises :class:`RequestFailed` when refused."""
        if not datasets:
            return
        reply = self._call(lambda: self._client.store_instances(list(datasets)), "store")
        failed = len(reply.get("FailedSOPSequence", []) or []) if reply is not None else 0
        if failed:
            raise RequestFailed(None, f"store: the server refused {failed} of {len(datasets)}")
