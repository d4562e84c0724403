"""Thumbnails of flagged images for the review page: the radiograph and its Grad-CAM overlay.

A scan writes one PNG per flagged image (``--heatmaps``, named by
:func:`osteoscan.writers.heatmap_name`): the radiograph with the heatmap blended in (JET colour
map, ``alpha`` 0.4, :func:`osteoscan.gradcam.overlay`) inside the model's region. A reader also
wants the radiograph *without* colour beside it. The blend is undone here, pixel by pixel: a
blended pixel is ``(1 - a) * grey + a * jet[k]`` for one unknown grey level and one of 256 colour
map entries, so the entry that leaves three equal channels is found (a least-squares fit over
the 256 entries) and the grey level follows. Pixels outside the model's region were never
coloured (their channels are equal) and stay as they are. The result is exact up to rounding
at full resolution and a close approximation on a downsized copy (the heatmap is smooth).

Thumbnails are small JPEGs in the page's folder, so the page loads quickly and can be copied
with its folder; each is remade only when its PNG is newer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osteoscan.rows import ResultRow
from osteoscan.writers import heatmap_name

OVERLAY_ALPHA = 0.4  # osteoscan.gradcam.overlay's default (a test keeps them equal)
THUMB_SIDE = 320  # longest side of a thumbnail, px
_MAX_PNG_BYTES = 64 * 1024 * 1024  # a heatmap PNG is at most 1024 px a side: far below this
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Thumb:
    """Files for one flagged row, relative to the report's asset folder; ``None``: no PNG."""

    plain: str | None = None  # the radiograph, colour removed
    overlay: str | None = None  # the Grad-CAM overlay
    source: Path | None = None  # the full-size PNG the thumbnails were made from


def _jet_table() -> np.ndarray:
    import cv2

    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), cv2.COLORMAP_JET)
    return cv2.cvtColor(lut, cv2.COLOR_BGR2RGB).reshape(256, 3).astype(np.float32)


def unblend(rgb: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Grey ``uint8`` (H, W) radiograph from a heatmap overlay ``rgb`` (H, W, 3) ``uint8``."""
    img = np.asarray(rgb, np.float32)
    out = img.mean(axis=2)
    coloured = np.ptp(img, axis=2) > 1.5  # grey pixels (outside the model's region) stay
    if coloured.any():
        px = img[coloured]  # (N, 3)
        jet = alpha * _jet_table()  # (256, 3): the colour each entry adds
        # grey is what is left once jet[k] is removed; the right k leaves equal channels, i.e.
        # minimises the spread of px - jet[k] around its mean (expanded so it is one matmul).
        pc = px - px.mean(axis=1, keepdims=True)
        jc = jet - jet.mean(axis=1, keepdims=True)
        cost = (jc * jc).sum(axis=1)[None, :] - 2.0 * pc @ jc.T  # (N, 256)
        k = cost.argmin(axis=1)
        out[coloured] = (px - jet[k]).mean(axis=1) / (1.0 - alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def find_png(row: ResultRow, heatmaps_dir: Path | None, base: Path) -> Path | None:
    """The heatmap PNG of ``row``: ``<heatmaps_dir>/<heatmap_name(image_id)>``, else the path in
    its ``heatmap`` column (as written, or relative to the results CSV's folder ``base``)."""
    candidates: list[Path] = []
    if heatmaps_dir is not None and row.image_id:
        candidates.append(heatmaps_dir / heatmap_name(row.image_id))
    if row.heatmap:
        named = Path(row.heatmap)
        candidates += [named] if named.is_absolute() else [named, base / named]
    for path in candidates:
        try:
            if path.is_file() and 0 < path.stat().st_size <= _MAX_PNG_BYTES:
                return path
        except OSError:
            continue
    return None


def _read_png(path: Path) -> np.ndarray | None:
    import cv2

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_PNG_MAGIC):
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _fresh(target: Path, source: Path) -> bool:
    try:
        return target.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except OSError:
        return False


def _write_jpeg(target: Path, image: np.ndarray) -> None:
    import cv2

    arr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if ok:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, target)  # a reader never sees half a thumbnail


def make_thumbnails(
    rows: Iterable[ResultRow], heatmaps_dir: Path | None, base: Path, folder: Path
) -> dict[str, Thumb]:
    """Thumbnails for ``rows`` written to ``folder`` (named ``<folder name>/<file>`` in the
    result), by image_id. Rows without a readable PNG get no entry (the page shows a
    placeholder)."""
    import cv2

    out: dict[str, Thumb] = {}
    for row in rows:
        if row.image_id in out:
            continue
        src = find_png(row, heatmaps_dir, base)
        if src is None:
            continue
        stem = heatmap_name(row.image_id).removesuffix(".png")
        plain, over = folder / f"{stem}-plain.jpg", folder / f"{stem}-heatmap.jpg"
        if not (_fresh(plain, src) and _fresh(over, src)):
            rgb = _read_png(src)
            if rgb is None:
                continue
            h, w = rgb.shape[:2]
            scale = min(1.0, THUMB_SIDE / max(h, w))
            if scale < 1.0:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            folder.mkdir(parents=True, exist_ok=True)
            _write_jpeg(over, rgb)
            _write_jpeg(plain, unblend(rgb))
        out[row.image_id] = Thumb(f"{folder.name}/{plain.name}", f"{folder.name}/{over.name}", src)
    return out
