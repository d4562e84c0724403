"""Credentials for a DICOMweb server: a bearer token or the user's ``~/.netrc``, never argv.

Order: ``OSTEOSCAN_DICOMWEB_TOKEN`` (sent as ``Authorization: Bearer …``), else the ``.netrc``
entry for the host (HTTP basic; the file named by ``NETRC``, else ``~/.netrc``), else none.
The secret lives only in the ``requests`` session: nothing here returns or prints it.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import requests
import requests.auth

from osteoscan.errors import UsageError
from osteoscan.pacs.url import ServerUrl

TOKEN_ENV = "OSTEOSCAN_DICOMWEB_TOKEN"


def netrc_path() -> Path:
    """The ``.netrc`` file to read: ``$NETRC`` or ``~/.netrc``."""
    return Path(os.environ.get("NETRC") or Path.home() / ".netrc")


def _netrc_login(host: str) -> tuple[str, str] | None:
    path = netrc_path()
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        # the parse error's text may quote the file; name the file and line only
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        raise UsageError(f"cannot read {path}{where}: fix its syntax or permissions") from None
    if entry is None:
        return None
    login, _account, password = entry
    return (login or "", password or "")


class _Bearer(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``; its repr never shows the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "<bearer token>"


def describe(url: ServerUrl) -> str:
    """Which kind of credentials would be used for ``url`` (for logs: never the secret)."""
    if os.environ.get(TOKEN_ENV):
        return f"bearer token from {TOKEN_ENV}"
    return f"HTTP basic from {netrc_path()}" if _netrc_login(url.host) else "no credentials"


def session_for(url: ServerUrl) -> requests.Session:
    """A ``requests`` session carrying the credentials for ``url`` (see the module docstring)."""
    session = requests.Session()
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        # as session.auth (not a header) so requests does not let ~/.netrc override it
        session.auth = _Bearer(token)
        return session
    login = _netrc_login(url.host)
    if login is not None:
        session.auth = login
    return session
