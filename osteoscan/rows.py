"""The result row: one owner for its columns, its values, its timestamps and its formatting.

Every stage that makes or reads a row of ``results.csv`` uses :class:`ResultRow`: the load stage's
status records become rows here (:meth:`ResultRow.from_frame`), the score stage fills the model
fields, the state stores :meth:`ResultRow.as_dict`, and the writers format each cell with
:func:`format_value`. Column order (README, "What you get")::

    path, frame, image_id, status, reason, body_part, model, p_<class>..., prediction,
    score, threshold, flagged, uncertainty, [tscore,] heatmap, scanned_at, covariates
    [, patient_id, accession_number]

Times are UTC, ISO 8601 to the second with a ``Z`` (``2026-11-30T10:14:25Z``), everywhere.

CSV cells are inert (:func:`osteoscan.inert.csv_cell`): text cells (path, image_id, reason,
body part, model, heatmap, covariates, identifiers…) show control characters as visible escapes,
are cut to a few KB, and get a leading ``'`` when they start like a formula (``=``, ``+``, ``-``,
``@``, tab, CR). Numeric cells (``p_<class>``, score, threshold, uncertainty, frame, flagged)
are written as numbers; a text cell that is a plain number (``-0.5``) is never prefixed. The
state and the HDF5 keep the raw values (:meth:`ResultRow.as_dict`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from osteoscan.inert import csv_cell, uncell

if TYPE_CHECKING:
    from osteoscan.geometry import InputGeometry
    from osteoscan.load import LoadedFrame

COLUMNS_BEFORE_PROBS: tuple[str, ...] = (
    "path", "frame", "image_id", "status", "reason", "body_part", "model",
)  # fmt: skip
COLUMNS_AFTER_PROBS: tuple[str, ...] = (
    "prediction", "score", "threshold", "flagged", "uncertainty", "heatmap", "scanned_at",
    "covariates",
)  # fmt: skip
# Only in the results of T-score models (``train --target tscore``), after ``uncertainty``.
TSCORE_COLUMN = "tscore"
# Identifier columns, appended only with --include-phi.
PHI_COLUMNS: tuple[str, ...] = ("patient_id", "accession_number")
_FLOAT_COLUMNS = frozenset({"score", "threshold", "uncertainty", "tscore"})


def utc_now() -> str:
    """Now, as every osteoscan timestamp is written: UTC, ISO 8601, seconds, ``Z``."""
    return datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def union_classes(class_lists: Iterable[Sequence[str]]) -> list[str]:
    """Classes of several models in first-seen order (the p_<class> columns of a mixed scan)."""
    out: list[str] = []
    for classes in class_lists:
        out.extend(c for c in classes if c not in out)
    return out


def result_columns(classes: Sequence[str], *, phi: bool = False, tscore: bool = False) -> list[str]:
    """The results.csv header for models with ``classes`` (plus the predicted T-score when a
    model predicts one, ``tscore``, and identifiers when ``phi``)."""
    after = list(COLUMNS_AFTER_PROBS)
    if tscore:
        after.insert(after.index("uncertainty") + 1, TSCORE_COLUMN)
    cols = [*COLUMNS_BEFORE_PROBS, *(f"p_{c}" for c in classes), *after]
    return [*cols, *PHI_COLUMNS] if phi else cols


def format_value(column: str, value: Any) -> str:
    """One CSV cell: floats with 6 decimals, booleans lower-case, None empty, integers as they
    are, and any other value as inert text (:func:`osteoscan.inert.csv_cell`)."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if column.startswith("p_") or column in _FLOAT_COLUMNS:
        v = float(value)
        return "" if np.isnan(v) else f"{v:.6f}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return csv_cell(value)


@dataclass
class ResultRow:
    """One row of results.csv. Model fields stay ``None`` on rows that were not scored."""

    path: str
    frame: int
    image_id: str
    status: str
    reason: str
    body_part: str
    scanned_at: str
    model: str = ""
    probs: dict[str, float] = field(default_factory=dict)  # class → calibrated probability
    prediction: str | None = None
    score: float | None = None
    threshold: float | None = None
    flagged: bool | None = None
    uncertainty: float | None = None
    tscore: float | None = None  # predicted T-score (T-score models only; osteoscan.scan.score)
    heatmap: str | None = None
    covariates: str = ""
    phi: dict[str, str] = field(default_factory=dict)  # only with --include-phi

    @classmethod
    def from_frame(cls, rec: LoadedFrame, scanned_at: str) -> ResultRow:
        """The row of a load-stage record, before (or instead of) scoring."""
        return cls(
            path=rec.path, frame=rec.frame, image_id=rec.image_id, status=rec.status,
            reason=rec.reason, body_part=rec.body_part, scanned_at=scanned_at,
        )  # fmt: skip

    @classmethod
    def error(cls, path: str, reason: str, scanned_at: str | None = None) -> ResultRow:
        """An ``error`` row for a whole file (nothing was read from it)."""
        return cls(path=path, frame=0, image_id="", status="error", reason=reason,
                   body_part="unknown", scanned_at=scanned_at or utc_now())  # fmt: skip

    @property
    def is_flagged(self) -> bool:
        """True only for a scored row at or above its threshold."""
        return bool(self.flagged)

    def as_dict(self) -> dict[str, Any]:
        """Flat mapping keyed by CSV column (``p_<class>`` per class; identifiers when present)."""
        out: dict[str, Any] = {c: getattr(self, c) for c in COLUMNS_BEFORE_PROBS}
        out.update({f"p_{c}": float(p) for c, p in self.probs.items()})
        out.update({c: getattr(self, c) for c in COLUMNS_AFTER_PROBS})
        out[TSCORE_COLUMN] = self.tscore
        out.update(self.phi)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultRow:
        """Inverse of :meth:`as_dict` (rows stored by any osteoscan version)."""
        flagged = data.get("flagged")
        if isinstance(flagged, str):  # older states kept CSV spellings
            flagged = {"true": True, "false": False}.get(flagged)

        def num(key: str) -> float | None:
            v = data.get(key)
            return None if v in (None, "") else float(v)

        return cls(
            path=str(data["path"]), frame=int(data.get("frame") or 0),
            image_id=str(data.get("image_id") or ""), status=str(data.get("status") or ""),
            reason=str(data.get("reason") or ""), body_part=str(data.get("body_part") or ""),
            scanned_at=normalise_timestamp(str(data.get("scanned_at") or "")),
            model=str(data.get("model") or ""),
            probs={k[2:]: float(v) for k, v in data.items()
                   if k.startswith("p_") and v not in (None, "")},
            prediction=data.get("prediction") or None, score=num("score"),
            threshold=num("threshold"), flagged=None if flagged is None else bool(flagged),
            uncertainty=num("uncertainty"), tscore=num("tscore"),
            heatmap=data.get("heatmap") or None,
            covariates=str(data.get("covariates") or ""),
            phi={k: str(data[k]) for k in PHI_COLUMNS if k in data},
        )  # fmt: skip

    @classmethod
    def from_csv_cells(cls, cells: Mapping[str, str]) -> ResultRow:
        """A row read back from a results CSV: :meth:`from_dict` after undoing the formula
        prefix (:func:`osteoscan.inert.uncell`). Escaped control characters and cut cells stay
        as written; the state and the HDF5 hold the raw values."""
        return cls.from_dict({k: uncell(v) if isinstance(v, str) else v for k, v in cells.items()})

    def csv_cells(self, columns: Sequence[str]) -> list[str]:
        """This row's cells for ``columns`` (missing columns empty)."""
        flat = self.as_dict()
        return [format_value(c, flat.get(c)) for c in columns]


# Suffixes kept on a pseudonym (they say what kind of file it was, nothing about a person).
_KNOWN_SUFFIXES = frozenset({".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".j2k",
                             ".jp2"})  # fmt: skip


def pseudonym(path: str, secret: str) -> str:
    """A stable stand-in for ``path`` (keyed hash): the same path gives the same name every
    night, and without the secret (kept only in the state) it cannot be traced back."""
    digest = hmac.new(secret.encode(), path.encode("utf-8", "surrogateescape"), hashlib.sha256)
    suffix = PurePath(path).suffix.lower()
    return f"redacted/{digest.hexdigest()[:20]}{suffix if suffix in _KNOWN_SUFFIXES else ''}"


def redact_row(row: ResultRow, secret: str | None) -> ResultRow:
    """``row`` with its path as a pseudonym and the path's parts scrubbed from its reason."""
    if not secret:
        return row
    alias = pseudonym(row.path, secret)
    reason = row.reason.replace(row.path, alias)
    for part in PurePath(row.path).parts:
        if len(part) >= 3 and part != "/":  # folder and file names may hold a patient's name
            reason = reason.replace(part, "[redacted]")
    return replace(row, path=alias, reason=reason)


def normalise_timestamp(text: str) -> str:
    """Spell a stored UTC time the one way (``…Z``): states written before 0.2 mixed ``+00:00``."""
    return text[:-6] + "Z" if text.endswith("+00:00") else text


@dataclass
class ScoredRow:
    """A row on its way from the score stage to the state and the writers, with its arrays.

    ``file_frames`` is the number of rows the file produces in total (frames of a multi-frame
    DICOM; 1 for an error row): the state marks a file done only once all are recorded.
    ``member_probs`` (M, C), ``heatmap`` (h, w) and ``geometry`` (where the model input lies in
    the image) go to the HDF5; ``display`` (a small uint8 copy of the image) and ``model_input``
    (the uint16
    image the model saw) is only carried to draw the heatmap PNG and is never stored.
    """

    row: ResultRow
    file_frames: int = 1
    member_probs: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    model_input: np.ndarray | None = None
    geometry: InputGeometry | None = None
    display: np.ndarray | None = None
