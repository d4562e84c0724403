"""The one preprocessing function shared by ``train`` and ``scan``.

Host side (:func:`preprocess`, NumPy/OpenCV, runs in DataLoader workers): float image in [0, 1]
→ small single-channel ``uint16`` array of ``cfg.size`` × ``cfg.size``. Device side
(:func:`to_model_input`, torch): ``uint16`` batch → normalised 3-channel float tensor. Because the
model package stores the :class:`PreprocessConfig`, training and screening can never disagree on
what the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import cv2
import numpy as np
import torch

from osteoscan.constants import IMAGENET_MEAN, IMAGENET_STD, U16_MAX
from osteoscan.geometry import InputGeometry
from osteoscan.roi import detect_knee_joint, knee_pair


@dataclass(frozen=True)
class PreprocessConfig:
    """How a reader's float image becomes model input.

    - ``size``: output is ``size`` × ``size`` pixels.
    - ``resize``: ``"letterbox"`` keeps the aspect ratio and pads with black (0); ``"stretch"``
      resizes to the square, distorting the aspect ratio (what most published notebooks do).
    - ``normalize``: ``"percentile"`` stretches the ``[low_pct, high_pct]`` percentile range to
      [0, 1] (robust to burned-in labels and collimation), ``"minmax"`` uses min/max, ``"none"``
      keeps the reader's [0, 1] values.
    - ``clahe``: contrast-limited adaptive histogram equalisation after normalisation.
    - ``roi``: ``"knee_joint"`` first crops the float image to the knee joint(s) found by
      :func:`osteoscan.roi.detect_knee_joint` (a centre crop when none is found); ``"none"`` keeps
      the whole image; ``"knee_pair"`` puts each detected knee joint in its own square crop, side
      by side (:func:`osteoscan.roi.knee_pair`), so each joint keeps its own pixels.
    """

    size: int = 320
    resize: Literal["letterbox", "stretch"] = "letterbox"
    normalize: Literal["percentile", "minmax", "none"] = "percentile"
    low_pct: float = 0.5
    high_pct: float = 99.5
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    roi: Literal["none", "knee_joint", "knee_pair"] = "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in a model package manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, never silently dropped."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def _fit_size(height: int, width: int, size: int, resize: str) -> tuple[int, int]:
    if resize == "stretch":
        return size, size
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _normalize(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    if cfg.normalize == "none":
        return np.clip(img, 0.0, 1.0)
    if cfg.normalize == "percentile":
        lo, hi = np.percentile(img, [cfg.low_pct, cfg.high_pct])
    else:
        lo, hi = float(img.min()), float(img.max())
    if hi - lo < 1e-6:
        # A flat image carries no information; map it to mid-grey rather than dividing by zero.
        return np.full_like(img, 0.5)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def preprocess(image: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Turn a reader's float image (H, W) in [0, 1], bone bright, into model input.

    Returns a ``uint16`` array of shape ``(cfg.size, cfg.size)``. Pure: same input, same output.
    (:func:`preprocess_with_geometry` also says where the input came from in the image.)
    """
    return preprocess_with_geometry(image, cfg)[0]


def preprocess_with_geometry(
    image: np.ndarray, cfg: PreprocessConfig | None = None
) -> tuple[np.ndarray, InputGeometry | None]:
    """:func:`preprocess`, plus the :class:`~osteoscan.geometry.InputGeometry` that maps the
    input back onto ``image`` (``None`` for ``roi="knee_pair"``, whose two crops have no single
    inverse).

    Resizing comes first (area interpolation when shrinking) so the percentile statistics and
    CLAHE work at model resolution, which keeps this cheap for 3000-pixel radiographs.
    """
    cfg = cfg or PreprocessConfig()
    if image.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {image.shape}")
    img: np.ndarray = np.ascontiguousarray(image, dtype=np.float32)
    source = (int(img.shape[0]), int(img.shape[1]))
    crop = (0, 0, source[0], source[1])
    if cfg.roi == "knee_joint":
        # Crop at full resolution, before resizing, so the joint gets all of the model's pixels.
        crop = top, left, bottom, right = detect_knee_joint(img).box
        img = np.ascontiguousarray(img[top:bottom, left:right])
    elif cfg.roi == "knee_pair":
        img = np.ascontiguousarray(knee_pair(img), dtype=np.float32)
    elif cfg.roi != "none":
        raise ValueError(f"unknown roi {cfg.roi!r}; expected none, knee_joint or knee_pair")
    h, w = img.shape
    th, tw = _fit_size(h, w, cfg.size, cfg.resize)
    interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR
    img = cv2.resize(img, (tw, th), interpolation=interp)
    img = _normalize(img, cfg)
    out16: np.ndarray = np.round(img * U16_MAX).astype(np.uint16)
    if cfg.clahe:
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_grid,) * 2)
        out16 = clahe.apply(out16)
    top, left = (cfg.size - th) // 2, (cfg.size - tw) // 2
    geometry = None
    if cfg.roi != "knee_pair":
        box = (int(crop[0]), int(crop[1]), int(crop[2]), int(crop[3]))
        geometry = InputGeometry(source, box, (top, left, th, tw), cfg.size)
    if (th, tw) == (cfg.size, cfg.size):
        return out16, geometry
    canvas = np.zeros((cfg.size, cfg.size), dtype=np.uint16)
    canvas[top : top + th, left : left + tw] = out16
    return canvas, geometry


def to_model_input(
    batch: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Device-side half of preprocessing: ``uint16``/``uint8`` (B, 1, H, W) or (B, H, W) → float.

    Scales to [0, 1], replicates greyscale to 3 channels and applies the ImageNet mean/std the
    pretrained backbones expect. Run it on the device so only small integer tensors cross the bus.
    """
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    if batch.dtype == torch.uint8:
        x = batch.to(dtype) / 255.0
    elif batch.dtype in (torch.uint16, torch.int32, torch.int64):
        x = batch.to(torch.float32) / U16_MAX
    else:
        x = batch.to(torch.float32)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = ((x - m) / s).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    return x
