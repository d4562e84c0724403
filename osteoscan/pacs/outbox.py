"""Where DICOM results go: a folder (``--dicom-out``) and/or a DICOMweb server (``--send``).

``--dicom-out DIR`` writes ``DIR/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (temp file + rename).
``--send`` first writes each object to the pending folder ``<state>.outbox/`` (mode 0700), then
stores the pending objects by STOW-RS, a study at a time, and deletes each one the server
accepted. What a failed store (5xx, timeout, server down) leaves pending is stored by the next
run, even one with nothing new to scan: the pending folder is the memory of what was not sent
yet, and the state's meta table keeps the counts (``dicom_results``). A 401/403 stops the run
(exit 1, "authentication failed"); the objects stay pending.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from osteoscan.atomic import write_bytes

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from osteoscan.pacs.client import PacsClient
    from osteoscan.scan.state import ScanState

META_KEY = "dicom_results"


def outbox_dir_for(state_path: str | Path) -> Path:
    """The pending folder of ``--send``: ``<state>.outbox``."""
    return Path(str(state_path) + ".outbox")


def _encode(ds: Dataset) -> bytes:
    from io import BytesIO

    import pydicom

    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class Outbox:
    """Writes results to ``folder`` and queues them for ``client`` (either may be None)."""

    def __init__(self, folder: str | Path | None, client: PacsClient | None, pending: Path) -> None:
        self.folder = Path(folder) if folder else None
        self.client, self.pending = client, pending
        self.n_written = self.n_sent = self.left = 0
        self.last_error = ""

    def put(self, ds: Dataset) -> None:
        """Write ``ds`` to the folder and/or the pending queue."""
        data = _encode(ds)
        name = f"{ds.SOPInstanceUID}.dcm"
        if self.folder is not None:
            write_bytes(self.folder / str(ds.StudyInstanceUID) / name, data)
            self.n_written += 1
        if self.client is not None:
            self.pending.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_bytes(self.pending / name, data)

    def waiting(self) -> list[Path]:
        """Objects not stored yet, oldest first."""
        if not self.pending.is_dir():
            return []
        return sorted(self.pending.glob("*.dcm"), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def flush(self, state: ScanState) -> int:
        """Store every pending object (a study per request); returns how many remain."""
        import pydicom

        from osteoscan.pacs.client import RequestFailed

        if self.client is None:
            return 0
        studies: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
        for path in self.waiting():
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - a torn file (killed mid-write): made again? no
                os.unlink(path)
                continue
            studies[str(ds.StudyInstanceUID)].append((path, ds))
        for items in studies.values():
            try:
                self.client.store([ds for _, ds in items])
            except RequestFailed as exc:
                self.last_error = exc.detail
                continue
            for path, _ in items:
                path.unlink(missing_ok=True)
            self.n_sent += len(items)
        self.left = left = len(self.waiting())
        self._remember(state, left)
        return left

    def _remember(self, state: ScanState, left: int) -> None:
        old = json.loads(state.meta(META_KEY, "{}") or "{}")
        now = {
            "sent": int(old.get("sent", 0)) + self.n_sent,
            "written": int(old.get("written", 0)) + self.n_written,
            "pending": left,
            "last_error": self.last_error if left else "",
        }
        state.set_meta(META_KEY, json.dumps(now))
