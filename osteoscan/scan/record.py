"""The record stage: commit a scored batch to the state, one transaction per batch.

Rows reach the state only here. Identifier columns are read here, and only with
``--include-phi`` (:func:`phi_values`); heatmaps are kept in the state only when an HDF5 will be
exported from it (the PNGs were written by the export stage before this commit, so a row never
names a PNG that a kill prevented from being written).
"""

from __future__ import annotations

from collections.abc import Sequence

from osteoscan.rows import PHI_COLUMNS, ScoredRow
from osteoscan.scan.state import ScanState


def phi_values(path: str) -> dict[str, str]:
    """Patient ID and accession number of a DICOM file (only for ``--include-phi``)."""
    out = dict.fromkeys(PHI_COLUMNS, "")
    try:
        import pydicom

        ds = pydicom.dcmread(
            path, stop_before_pixels=True, force=True,
            specific_tags=["PatientID", "AccessionNumber"],
        )  # fmt: skip
        out["patient_id"] = str(ds.get("PatientID", "") or "")
        out["accession_number"] = str(ds.get("AccessionNumber", "") or "")
    except Exception:  # noqa: BLE001 - not a DICOM, or unreadable: no identifiers
        pass
    return out


def record_batch(
    state: ScanState,
    scored: Sequence[ScoredRow],
    key: str,
    *,
    keep_heatmaps: bool,
    include_phi: bool,
) -> None:
    """Commit ``scored`` under run key ``key`` (the whole batch or nothing)."""
    for item in scored:
        if include_phi:
            item.row.phi = phi_values(item.row.path)
        if not keep_heatmaps:
            item.heatmap = None
        item.model_input = item.display = None  # drawn already; never stored
    state.record(scored, key)
