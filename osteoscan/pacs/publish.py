"""The DICOM results stage: per scored row an SR, per study with flagged images a KOS, and with
``--dicom-heatmaps`` a secondary capture of each flagged image's heatmap.

Called by the scan orchestrator between *score* and *record* for each batch (:meth:`add`: the
source file, or the retrieved copy of a DICOMweb instance, is still there to take the patient and
study attributes from) and once at the end (:meth:`finish`: the KOS objects, then the store of
everything pending, including what earlier runs failed to store). Rows of non-DICOM files (PNG,
JPEG) have no study to belong to and get no DICOM result.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from osteoscan.errors import OutputError
from osteoscan.inert import log_safe
from osteoscan.pacs.outbox import Outbox, outbox_dir_for
from osteoscan.pacs.results import evidence_of, flagged_kos, heatmap_capture, screening_sr

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset

    from osteoscan.manifest import Manifest
    from osteoscan.rows import ScoredRow
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.state import ScanState


def _header(path: str | Path | None) -> Dataset | None:
    import pydicom

    if path is None or not Path(path).is_file():
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not a DICOM (PNG, JPEG) or unreadable: no result
        return None


def _overlay(item: ScoredRow) -> np.ndarray | None:
    if item.heatmap is None:
        return None
    if item.geometry is not None and item.display is not None:
        from osteoscan.geometry import overlay_on_source

        return overlay_on_source(item.display, item.heatmap, item.geometry)
    if item.model_input is not None:
        from osteoscan.gradcam import overlay

        return overlay(item.model_input, item.heatmap)
    return None


class DicomResults:
    """Builds and hands DICOM results to an :class:`~osteoscan.pacs.outbox.Outbox`."""

    def __init__(self, cfg: ScanConfig, manifests: Sequence[Manifest], state_path: Path) -> None:
        from osteoscan.manifest import package_identity

        client = None
        if cfg.send:
            from osteoscan.pacs.client import PacsClient
            from osteoscan.pacs.url import ServerUrl

            client = PacsClient(ServerUrl.parse(cfg.send), timeout=(10.0, cfg.dicomweb_timeout_s),
                                attempts=cfg.dicomweb_attempts,
                                backoff_s=cfg.dicomweb_backoff_s)  # fmt: skip
            client.check_auth()  # a wrong password fails now, not after a night of scoring
        self.outbox = Outbox(cfg.dicom_out, client, outbox_dir_for(state_path))
        self.models = {
            f"{m.name} {m.version}": {
                "name": m.name,
                "version": m.version,
                "sha": package_identity(m),
            }  # fmt: skip
            for m in manifests
        }
        self.heatmaps = cfg.dicom_heatmaps
        self.flagged: dict[str, list[Dataset]] = defaultdict(list)
        self.counts = {"sr": 0, "kos": 0, "capture": 0, "no_dicom": 0, "failed": 0}
        self.failure = ""

    def add(self, scored: Sequence[ScoredRow], locate: Callable[[str], str | Path | None]) -> None:
        """Results for the ``ok`` rows of a batch; ``locate(row.path)`` is the file to read."""
        for item in scored:
            row = item.row
            if row.status != "ok":
                continue
            header = _header(locate(row.path))
            evidence = evidence_of(header) if header is not None else None
            if header is None or evidence is None:
                self.counts["no_dicom"] += 1
                continue
            try:
                self._add(item, header, evidence)
            except OutputError:
                raise  # a full disk or an unwritable --dicom-out stops the run (exit 1)
            except Exception as exc:  # noqa: BLE001 - one odd header must not end the night
                self.counts["failed"] += 1
                self.failure = f"{type(exc).__name__}: {log_safe(exc)}"[:300]

    def _add(self, item: ScoredRow, header: Dataset, evidence: Dataset) -> None:
        row = item.row
        n_frames = int(header.get("NumberOfFrames", 1) or 1)
        model = self.models.get(row.model, {})
        self.outbox.put(screening_sr(evidence, row, model, n_frames))
        self.counts["sr"] += 1
        if not row.flagged:
            return
        self.flagged[str(evidence.StudyInstanceUID)].append(evidence)
        rgb = _overlay(item) if self.heatmaps else None
        if rgb is not None:
            orientation = header.get("PatientOrientation")
            self.outbox.put(heatmap_capture(evidence, rgb, orientation))
            self.counts["capture"] += 1

    def line(self) -> str:
        """One line for the log: objects made, stored, waiting (never identifiers)."""
        c, box = self.counts, self.outbox
        made = f"DICOM results: {c['sr']} SR, {c['kos']} KOS, {c['capture']} heatmap captures"
        where = f"; {box.n_written} written to {box.folder}" if box.folder else ""
        if box.client is not None:
            where += f"; {box.n_sent} stored at {box.client.url}, {box.left} waiting"
        return made + where

    def finish(self, state: ScanState) -> list[str]:
        """KOS per study with flagged images, then store what is pending; returns warnings."""
        for evidence in self.flagged.values():
            self.outbox.put(flagged_kos(evidence))
            self.counts["kos"] += 1
        self.flagged.clear()
        left = self.outbox.flush(state)
        out = []
        if self.counts["failed"]:
            out.append(f"{self.counts['failed']} DICOM results could not be made (an osteoscan "
                       f"bug on unusual headers; please report it): {self.failure}")  # fmt: skip
        if left:
            why = f" ({self.outbox.last_error})" if self.outbox.last_error else ""
            out.append(f"{left} DICOM results could not be stored{why}; they wait in "
                       f"{self.outbox.pending} and are stored by the next run")  # fmt: skip
        return out
