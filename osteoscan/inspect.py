"""What would the model see, and why: one plain record per image frame found.

:func:`inspect_paths` runs discovery and the readers over the given paths and yields one JSON-able
dict per image frame (:data:`INSPECT_KEYS`), with the header facts that drive routing and the
covariates. With ``export_dir`` it also writes each readable frame's preprocessed model input as
a 16-bit PNG, so a person can look at exactly what ``scan`` would feed the model.

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
from osteoscan.frames import ImageFrame
from osteoscan.preprocess import PreprocessConfig, preprocess

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
)
_INFO_KEYS = ("modality", "photometric", "transfer_syntax", "bits_stored", "rows", "columns")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _record(frame: ImageFrame, found: Found) -> dict[str, Any]:
    info = frame.info or {}
    row: dict[str, Any] = {
        "path": frame.path or str(found.path),
        "frame": int(frame.frame),
        "status": frame.status,
        "reason": frame.reason,
        "kind": frame.kind or found.kind,
        "body_part": frame.body_part,
        "body_part_reason": frame.body_part_reason,
        "age": None if frame.age is None else float(frame.age),
        "sex": frame.sex,
    }
    for key in _INFO_KEYS:
        value = info.get(key)
        # numpy / pydicom scalar types are not JSON-able; the header facts are ints or strings
        if value is not None and key in ("bits_stored", "rows", "columns"):
            value = int(value)
        elif value is not None:
            value = str(value)
        row[key] = value
    row["image_id"] = frame.image_id
    row["export"] = None
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
    )
    return row


def _read(found: Found) -> list[ImageFrame]:
    # Imported here so that discovery-only users do not pay for pydicom and its plugins.
    from osteoscan.readers import read_frames

    try:
        return read_frames(found.path, found.kind)
    except Exception as exc:  # noqa: BLE001 - the readers promise not to raise; one file never stops a batch
        return [
            ImageFrame(
                path=str(found.path),
                status="error",
                reason=f"internal error while reading ({type(exc).__name__}: {exc})",
                kind=found.kind,
            )
        ]


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
) -> Iterator[dict[str, Any]]:
    """Yield one record (keys :data:`INSPECT_KEYS`) per image frame under ``paths``.

    Files that :func:`~osteoscan.discover.sniff` calls ``broken`` give one ``status="error"``
    record with the reason; ``ignored`` entries (not images, DICOMDIR, unreadable folders) give no
    record and are passed to ``on_ignored`` when given. With ``export_dir``, every ``ok`` frame's
    :func:`~osteoscan.preprocess.preprocess` output (``cfg``, default config when None) is written
    there as a 16-bit PNG and its path put in ``export``. Raises
    :class:`~osteoscan.errors.OutputError` only when the export folder cannot be written.
    """
    cfg = cfg or PreprocessConfig()
    exporter = _Exporter(Path(export_dir)) if export_dir is not None else None
    for found in discover(paths, include=include, exclude=exclude):
        if found.kind == "broken":
            yield _broken_record(found)
            continue
        if found.kind not in IMAGE_KINDS:
            if on_ignored is not None:
                on_ignored(found)
            continue
        for frame in _read(found):
            row = _record(frame, found)
            if exporter is not None and frame.status == "ok" and frame.image is not None:
                try:
                    data = preprocess(frame.image, cfg)
                except Exception as exc:  # noqa: BLE001 - a degenerate image is a row, not a crash
                    row["status"] = "error"
                    row["reason"] = f"cannot preprocess ({type(exc).__name__}: {exc})"
                else:
                    row["export"] = exporter.write(found, frame.frame, data)
            yield row
