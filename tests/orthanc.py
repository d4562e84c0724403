"""A real Orthanc for tests: started on free loopback ports, stopped afterwards.

A test module wraps :func:`run_orthanc`, :func:`run_proxy` and :func:`write_netrc` in its own
fixtures (``yield from run_orthanc(tmp_path_factory)``).
:class:`Orthanc` runs ``/usr/sbin/Orthanc`` with a temporary storage folder, the DICOMweb plugin
and HTTP basic authentication on (one registered user); tests skip with a clear message when
Orthanc or its DICOMweb plugin is not installed (``.ci/run`` installs both).
:class:`RecordingProxy` sits in front of it: it logs every request (so a test counts WADO
retrievals on the wire, whatever the client does) and can answer 500 or hang for chosen paths.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ORTHANC = os.environ.get("OSTEOSCAN_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get(
    "OSTEOSCAN_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)
USER, PASSWORD = "osteo", "pw-Zq7-never-printed"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_missing() -> str:
    """Why Orthanc cannot run here ('' when it can)."""
    if not (shutil.which(ORTHANC) or os.access(ORTHANC, os.X_OK)):
        return f"Orthanc not installed ({ORTHANC}; apt-get install orthanc)"
    if not os.path.exists(DICOMWEB_PLUGIN):
        return f"Orthanc DICOMweb plugin not installed ({DICOMWEB_PLUGIN}; orthanc-dicomweb)"
    return ""


class Orthanc:
    """One Orthanc process with its own storage, DICOMweb at ``/dicom-web/``, basic auth on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        """Plain HTTP root of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The scan source for osteoscan: ``dicomweb+http://127.0.0.1:PORT/dicom-web``."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "osteoscan-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=log,
                                         cwd=self.folder)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {self.log.read_text()[-2000:]}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def ready(self) -> bool:
        """True when the REST API answers an authenticated request."""
        import requests

        try:
            r = requests.get(self.url + "/system", auth=(USER, PASSWORD), timeout=1)
        except requests.RequestException:
            return False
        return r.status_code == 200

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rest(self, path: str) -> object:
        """GET a REST API resource as JSON (``/studies``, ``/statistics``…)."""
        import requests

        r = requests.get(self.url + path, auth=(USER, PASSWORD), timeout=10)
        r.raise_for_status()
        return r.json()

    def upload(self, files: list[Path]) -> list[str]:
        """Store DICOM files through the REST API; returns their Orthanc ids (bad files: none)."""
        import requests

        ids = []
        for f in files:
            r = requests.post(self.url + "/instances", data=Path(f).read_bytes(),
                              auth=(USER, PASSWORD), timeout=30)  # fmt: skip
            if r.status_code == 200:
                ids.append(r.json()["ID"])
        return ids

    def clear(self) -> None:
        """Delete every patient (and so every study and instance)."""
        import requests

        for pid in self.rest("/patients"):  # type: ignore[union-attr]
            requests.delete(f"{self.url}/patients/{pid}", auth=(USER, PASSWORD), timeout=10)


class RecordingProxy:
    """HTTP proxy in front of a server: logs requests, answers 500/404 or hangs for chosen paths.

    ``fail`` (500), ``gone`` (404) and ``hang`` hold substrings of request paths; ``requests``
    lists (method, path) of everything forwarded or refused, so a test counts WADO retrievals
    as the server saw them. With ``bearer`` set it stands for a server that takes bearer tokens.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.gone: set[str] = set()
        self.hang: set[str] = set()
        # when set, the proxy is a token gateway: only "Bearer <bearer>" passes (else 401)
        self.bearer: str | None = None
        self.port = free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port),
                                                       self._handler())  # fmt: skip
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dicomweb(self) -> str:
        """The scan source through this proxy."""
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def retrievals(self) -> list[str]:
        """Paths of WADO-RS instance retrievals seen (GET …/instances/<uid>, not metadata)."""
        return [
            p for m, p in self.requests
            if m == "GET" and "/studies/" in p and "/instances/" in p
            and not p.split("?")[0].rstrip("/").endswith(("/metadata", "/rendered"))
        ]  # fmt: skip

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                import requests

                proxy.requests.append((self.command, self.path))
                if any(s in self.path for s in proxy.hang):
                    time.sleep(30)
                    return
                failing = [(proxy.fail, 500), (proxy.gone, 404)]
                code = next((c for subs, c in failing if any(s in self.path for s in subs)), 0)
                auth = self.headers.get("Authorization", "")
                if proxy.bearer is not None and auth != f"Bearer {proxy.bearer}":
                    code = 401
                if code:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "accept-encoding")
                }
                if proxy.bearer is not None:  # a token gateway: Orthanc itself wants basic auth
                    headers.pop("Authorization", None)
                r = requests.request(self.command, proxy.upstream + self.path, data=body,
                                     headers=headers, timeout=60, stream=False,
                                     auth=(USER, PASSWORD) if proxy.bearer else None)  # fmt: skip
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection",
                                         "content-encoding"):  # fmt: skip
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_DELETE = do_PUT = _forward  # noqa: N815

        return Handler

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def run_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Body of a module-scoped fixture: a running Orthanc (skips when not installed)."""
    why = orthanc_missing()
    if why:
        pytest.skip(why)
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_proxy(server: Orthanc) -> Iterator[RecordingProxy]:
    """Body of a fixture: a :class:`RecordingProxy` in front of ``server``."""
    proxy = RecordingProxy(server.url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def write_netrc(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``.netrc`` with the test user for 127.0.0.1, used through ``NETRC``; no token set."""
    path = folder / "netrc"
    path.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    monkeypatch.delenv("OSTEOSCAN_DICOMWEB_TOKEN", raising=False)
    return path
