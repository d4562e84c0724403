"""Where the model input came from in the radiograph, so a heatmap can be drawn back on it.

Preprocessing crops a region of interest (the knee joint) and letterboxes it into a square
(:func:`osteoscan.preprocess.preprocess_with_geometry`). :class:`InputGeometry` records both
steps; :meth:`InputGeometry.to_source` inverts them for a heatmap made at model-input size, and
:func:`overlay_on_source` draws it on (a downsized copy of) the original radiograph with the
model's region outlined: a reader looks at the radiograph, not at the padded model input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DISPLAY_MAX_SIDE = 1024  # longest side of the radiograph copy the overlay is drawn on
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class InputGeometry:
    """``crop`` (top, left, bottom, right; half-open) in source pixels of a (H, W) ``source``
    image was resized to ``placed`` (top, left, height, width) inside the ``size`` x ``size``
    model input; the rest of the input is padding."""

    source: tuple[int, int]
    crop: Box
    placed: Box
    size: int

    def to_source(self, heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The model-input ``heatmap`` (size x size) mapped onto a ``shape`` copy of the source:
        padding is dropped, the rest scaled into the crop box, zero outside it."""
        import cv2  # lazily: a no-op nightly rescan imports this module but never draws

        hm: np.ndarray = np.asarray(heatmap, dtype=np.float32)
        if hm.shape != (self.size, self.size):
            hm = cv2.resize(hm, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        top, left, height, width = self.placed
        inside = hm[top : top + height, left : left + width]
        t, lf, b, r = self.scaled_crop(shape)
        out = np.zeros(shape, dtype=np.float32)
        if b > t and r > lf and inside.size:
            out[t:b, lf:r] = cv2.resize(inside, (r - lf, b - t), interpolation=cv2.INTER_LINEAR)
        return out

    def scaled_crop(self, shape: tuple[int, int]) -> Box:
        """The crop box in the coordinates of a ``shape`` copy of the source."""
        sy, sx = shape[0] / self.source[0], shape[1] / self.source[1]
        top, left, bottom, right = self.crop
        return (round(top * sy), round(left * sx), round(bottom * sy), round(right * sx))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored with the row; written to the HDF5)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InputGeometry | None:
        """Inverse of :meth:`to_dict`; ``None`` stays ``None``."""
        if not data:
            return None
        src, crop, placed = (tuple(int(v) for v in data[k]) for k in ("source", "crop", "placed"))
        return cls((src[0], src[1]), (crop[0], crop[1], crop[2], crop[3]),
                   (placed[0], placed[1], placed[2], placed[3]), int(data["size"]))  # fmt: skip


def display_copy(image: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """``uint8`` copy of a float [0, 1] radiograph, longest side at most ``max_side``."""
    import cv2

    h, w = image.shape
    scale = min(1.0, max_side / max(h, w))
    img: np.ndarray = np.asarray(image, dtype=np.float32)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def overlay_on_source(
    display: np.ndarray, heatmap: np.ndarray, geometry: InputGeometry, alpha: float = 0.4
) -> np.ndarray:
    """RGB ``uint8`` overlay of the model-input ``heatmap`` on the radiograph ``display`` copy,
    with the region the model saw outlined in white."""
    import cv2

    from osteoscan.gradcam import overlay

    shape = (int(display.shape[0]), int(display.shape[1]))
    top, left, bottom, right = geometry.scaled_crop(shape)
    rgb = np.repeat(np.asarray(display, np.uint8)[:, :, None], 3, axis=2)
    # colour only the region the model saw: outside it the radiograph stays as it is
    coloured = overlay(display, geometry.to_source(heatmap, shape), alpha=alpha)
    rgb[top:bottom, left:right] = coloured[top:bottom, left:right]
    thickness = max(1, round(max(shape) / 400))
    cv2.rectangle(rgb, (left, top), (max(left, right - 1), max(top, bottom - 1)),
                  (255, 255, 255), thickness)  # fmt: skip
    return rgb
