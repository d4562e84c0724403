"""The record that flows from the readers to preprocessing, training and scanning.

One :class:`ImageFrame` per image frame found (a multi-frame DICOM gives several). Readers never
raise for a bad file: they return a frame with ``status="error"`` and a reason a person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Status = Literal["ok", "skipped", "error"]
STATUSES: tuple[str, ...] = ("ok", "skipped", "error")
BODY_PARTS: tuple[str, ...] = ("knee", "spine", "unknown")


@dataclass
class ImageFrame:
    """One image frame (or one file that failed), as the reader saw it.

    ``image`` is float32, shape (H, W), values in [0, 1], *bone bright* whatever the photometric
    interpretation of the file; ``None`` unless ``status == "ok"``. ``info`` carries technical facts
    for ``osteoscan inspect`` (modality, photometric, transfer_syntax, bits_stored, rows, columns,
    sop_class_uid, n_frames, voi). Patient name, ID and birth date are never stored here.
    """

    path: str
    frame: int = 0
    status: Status = "ok"
    reason: str = ""
    kind: str = ""
    image: np.ndarray | None = None
    image_id: str = ""
    body_part: str = "unknown"
    body_part_reason: str = ""
    # the file itself names a body part (a DICOM header: knee, spine or another such as CHEST)
    body_part_stated: bool = False
    age: float | None = None
    sex: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadLimits:
    """Per-file guards so a decompression bomb or absurd header cannot exhaust the run."""

    max_pixels: int = 150_000_000  # rows * columns * frames * samples, checked before decoding
    max_file_bytes: int = 2 * 1024**3
    max_frames: int = 2000
