"""What would the model see, and why: one plain record per image frame found.

:func:`inspect_paths` runs discovery and then the scan's own load stage (:mod:`osteoscan.load`:
guarded read → gate → routing → preprocessing) over the given paths and yields one JSON-able dict
per image frame (:data:`INSPECT_KEYS`): the status and reason ``scan`` would give it, the gate's
decision (``gate``, ``gate_reason``: is it a projection radiograph, and why), and the header
facts that drive routing and the covariates. With ``export_dir`` it also writes each frame's
preprocessed model input as a 16-bit PNG, so a person can look at what the model would be fed.

Inspection needs no model: its loader routes every frame that passes the gate to one
preprocessing (:func:`inspect_loader`), whatever its body part, and shows the body part with how
it was decided, so a person can see which model a scan would route it to.

Patient name, ID and birth date never appear here: only the facts listed in :data:`INSPECT_KEYS`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from osteoscan.atomic import output_errors, write_bytes
from osteoscan.discover import IMAGE_KINDS, Found, discover
from osteoscan.errors import OutputError
from osteoscan.load import LoadedFrame, Loader
from osteoscan.preprocess import PreprocessConfig
from osteoscan.scan.routing import ROUTABLE_PARTS, Router

INSPECT_KEYS: tuple[str, ...] = (
    "path",
    "frame",
    "status",
    "reason",
    "kind",
    "body_part",
    "body_part_reason",
    "age",
    "sex",
    "modality",
    "photometric",
    "transfer_syntax",
    "bits_stored",
    "rows",
    "columns",
    "image_id",
    "export",
    "gate",
    "gate_reason",
)
_INFO_KEYS = ("modality", "photometric", "transfer_syntax", "bits_stored", "rows", "columns")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def inspect_loader(cfg: PreprocessConfig | None = None) -> Loader:
    """The load stage as ``inspect`` runs it: every part (``unknown`` included) is "served".

    The gate and the reader decide ``skipped``/``error`` exactly as in a scan; routing, which
    depends on the models a scan loads, never skips here — the record's body part and its reason
    say where a scan would send the frame.
    """
    return Loader(Router([[*ROUTABLE_PARTS, "unknown"]], ["inspect"]), [cfg or PreprocessConfig()])


def _record(rec: LoadedFrame, found: Found) -> dict[str, Any]:
    info = rec.info or {}
    row: dict[str, Any] = {
        "path": rec.path or str(found.path),
        "frame": int(rec.frame),
        "status": rec.status,
        "reason": rec.reason,
        "kind": rec.kind or found.kind,
        "body_part": rec.body_part,
        "body_part_reason": rec.body_part_reason,
        "age": None if rec.age is None else float(rec.age),
        "sex": rec.sex,
    }
    for key in _INFO_KEYS:
        value = info.get(key)
        # numpy / pydicom scalar types are not JSON-able; the header facts are ints or strings
        if value is not None and key in ("bits_stored", "rows", "columns"):
            value = int(value)
        elif value is not None:
            value = str(value)
        row[key] = value
    row["image_id"] = rec.image_id
    row["export"] = None
    row["gate"] = None if rec.gate is None else rec.gate.value
    row["gate_reason"] = rec.gate_reason
    return row


def _broken_record(found: Found) -> dict[str, Any]:
    row = dict.fromkeys(INSPECT_KEYS)
    row.update(
        path=str(found.path),
        frame=0,
        status="error",
        reason=found.reason,
        kind=found.kind,
        body_part="unknown",
        body_part_reason="",
        image_id="",
        gate_reason="",
    )
    return row


class _Exporter:
    """Writes preprocessed frames as 16-bit PNGs with deterministic, collision-free names."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.used: set[str] = set()
        with output_errors(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def name(self, found: Found, frame: int) -> str:
        """``<relative path with separators as '__'>_f<frame>.png``; a hash breaks ties."""
        stem = _UNSAFE.sub("_", found.relpath.replace("/", "__")).strip("._") or "image"
        name = f"{stem}_f{frame}.png"
        if name in self.used:
            digest = hashlib.sha256(str(found.path).encode()).hexdigest()[:10]
            name = f"{stem}_{digest}_f{frame}.png"
            n = 2
            while name in self.used:  # same path given twice: still never overwrite
                name = f"{stem}_{digest}_{n}_f{frame}.png"
                n += 1
        self.used.add(name)
        return name

    def write(self, found: Found, frame: int, data: np.ndarray) -> str:
        target = self.out_dir / self.name(found, frame)
        ok, buf = cv2.imencode(".png", data)
        if not ok:
            raise OutputError(f"could not encode the PNG for {target}")
        return str(write_bytes(target, buf.tobytes()))


def inspect_paths(
    paths: Sequence[str | Path],
    export_dir: str | Path | None = None,
    cfg: PreprocessConfig | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    on_ignored: Callable[[Found], None] | None = None,
    loader: Loader | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one record (keys :data:`INSPECT_KEYS`) per image frame under ``paths``.

    Files that :func:`~osteoscan.discover.sniff` calls ``broken`` give one ``status="error"``
    record with the reason; ``ignored`` entries (not images, DICOMDIR, unreadable folders) give no
    record and are passed to ``on_ignored`` when given. Every other file goes through ``loader``
    (default: :func:`inspect_loader` with ``cfg``). With ``export_dir``, every ``ok`` frame's
    model input is written there as a 16-bit PNG and its path put in ``export``. Raises
    :class:`~osteoscan.errors.OutputError` only when the export folder cannot be written.
    """
    load = loader or inspect_loader(cfg)
    exporter = _Exporter(Path(export_dir)) if export_dir is not None else None
    for found in discover(paths, include=include, exclude=exclude):
        if found.kind == "broken":
            yield _broken_record(found)
            continue
        if found.kind not in IMAGE_KINDS:
            if on_ignored is not None:
                on_ignored(found)
            continue
        for rec in load(found.path, found.kind, found.root):
            row = _record(rec, found)
            if exporter is not None and rec.scorable and rec.pixels is not None:
                row["export"] = exporter.write(found, rec.frame, rec.pixels)
            yield row
