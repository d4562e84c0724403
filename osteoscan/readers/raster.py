"""PNG / JPEG / TIFF / JPEG 2000 files → :class:`~osteoscan.frames.ImageFrame`, never raising.

- **Full depth.** OpenCV reads with ``IMREAD_UNCHANGED`` (8- and 16-bit kept as they are); values
  are mapped over the *full* range of the container (``/255`` or ``/65535``), never the image's own
  min/max — the same policy as DICOM without a window, so a 16-bit PNG and a 16-bit DICOM of the
  same pixels give the same image. Floating-point TIFFs already in [0, 1] are kept; other float
  ranges are min/max scaled (there is no container range to use), which ``info["range"]`` says.
- **Colour → grey.** BGR(A) becomes BT.601 luminance; alpha is dropped.
- **EXIF orientation is honoured** (JPEG/TIFF/PNG ``Orientation`` tag, read with Pillow from the
  header only). Exports from phones, scanners and some PACS viewers store the image sideways and
  rely on the tag; a person looking at the file sees the rotated image, so that is what the model
  gets too. The applied value is kept in ``info["exif_orientation"]``.
- **Multi-page TIFF** gives one frame per page.
- Size is checked from the header against :class:`~osteoscan.frames.ReadLimits` before decoding.
- **Truncated or corrupt files are errors.** A JPEG, PNG or JPEG 2000 that does not end with its
  end marker is an ``error`` before any decoding (libjpeg would turn a JPEG cut to 2 % of its size
  into a grey ``ok`` image); whatever libjpeg, libpng or OpenJPEG print while decoding is
  captured (:mod:`osteoscan.readers.capture`) and makes the file an ``error`` with that text.
- ``info["colour_fraction"]``: the share of coloured pixels, measured before the conversion to
  grey, for the gate (:mod:`osteoscan.gate`) that skips colour pictures.
- Body part is ``unknown`` (these formats carry no header facts): the scan's ``--body-part``
  option or the folder decides; age and sex come from a covariates CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from osteoscan.frames import ImageFrame, ReadLimits
from osteoscan.hashing import content_image_id
from osteoscan.readers import pixels
from osteoscan.readers.capture import decoder_messages

__all__ = ["read_raster", "file_image_id"]

_ORIENT_OPS = {  # EXIF orientation → numpy operations that display the image upright
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=1)[::-1, :],
    8: lambda a: np.rot90(a, k=1),
}
_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "jpeg2000": "JPEG 2000"}
# The marker a complete file ends with, and how far from the end it may sit (trailing padding).
_END_MARKERS = {
    "jpeg": (b"\xff\xd9", 1 << 16, "end-of-image marker"),
    "png": (b"IEND", 1 << 10, "IEND chunk"),
    "jpeg2000": (b"\xff\xd9", 1 << 16, "end-of-codestream marker"),
}
_CHROMA = 0.1  # a pixel is "coloured" when max - min of its RGB exceeds 10 % of full scale


def file_image_id(path: str | Path) -> str:
    """``"sha256:"`` + first 32 hex digits of the file's SHA-256 (content identity)."""
    return content_image_id(path)


def _header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, pages, exif orientation) from the file header without decoding pixels."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own limit applies (ReadLimits), checked by the caller
    with Image.open(path) as im:
        width, height = im.size
        pages = int(getattr(im, "n_frames", 1) or 1)
        try:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
            orientation = 1
    return width, height, pages, orientation if orientation in range(1, 9) else 1


def _to_float(arr: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """One decoded page → float32 (H, W) in [0, 1] using the container's full range."""
    if arr.ndim == 3 and arr.shape[2] >= 3:
        # OpenCV gives BGR(A); reorder to RGB for the luminance weights, drop alpha.
        grey = pixels.luminance(arr[..., [2, 1, 0]])
        info["colour"] = "luminance"
    elif arr.dtype in (np.uint8, np.uint16):
        levels = np.iinfo(arr.dtype).max
        info["range"] = f"0..{float(levels):g}"
        # A float32 division is correctly rounded: for every 8- and 16-bit level it gives the
        # very float32 of dividing in float64 (tests/test_quantiles.py checks all of them), in
        # two passes over the pixels instead of four float64 ones.
        out = (arr[..., 0] if arr.ndim == 3 else arr).astype(np.float32)
        out /= np.float32(levels)
        return out
    else:
        grey = np.asarray(arr[..., 0] if arr.ndim == 3 else arr, dtype=np.float64)
    if arr.dtype in (np.uint8, np.uint16):
        top = float(np.iinfo(arr.dtype).max)
        info["range"] = f"0..{top:g}"
        return np.clip(grey / top, 0.0, 1.0).astype(np.float32)
    if arr.dtype.kind == "f" and np.nanmin(grey) >= 0 and np.nanmax(grey) <= 1:
        info["range"] = "0..1 (float)"
        return np.nan_to_num(grey).astype(np.float32)
    lo, hi = float(np.nanmin(grey)), float(np.nanmax(grey))
    info["range"] = f"min/max {lo:g}..{hi:g} ({arr.dtype})"
    if hi <= lo:
        return np.zeros(grey.shape, np.float32)
    return np.nan_to_num((grey - lo) / (hi - lo)).astype(np.float32)


def colour_fraction(arr: np.ndarray) -> float:
    """Share of pixels of a decoded BGR(A) page that are coloured (0 for a greyscale page).

    A strided sample is enough: the gate only asks whether a picture is clearly colour.
    """
    if arr.ndim != 3 or arr.shape[2] < 3:
        return 0.0
    step = max(1, -(-max(arr.shape[:2]) // 512))
    sample = np.asarray(arr[::step, ::step, :3], dtype=np.float32)
    top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
    chroma = (sample.max(axis=2) - sample.min(axis=2)) / top
    return round(float(np.mean(chroma > _CHROMA)), 4)


def truncation_reason(path: Path, kind: str, size: int) -> str:
    """Why the file is cut short ('' when it ends as its format requires).

    Checked before decoding: libjpeg decodes a JPEG cut to 2 % of its size into a grey image
    with only a warning on stderr, which would make it an ``ok`` row.
    """
    marker = _END_MARKERS.get(kind)
    if marker is None or (kind == "jpeg2000" and not _raw_or_jp2(path)):
        return ""
    token, window, what = marker
    with open(path, "rb") as fh:
        fh.seek(max(0, size - window))
        tail = fh.read()
    if token in tail:
        return ""
    fmt = _FORMAT_NAMES[kind]
    return (
        f"truncated {fmt} file: it ends after {size} bytes without its {what} "
        "(cut short during transfer or export?)"
    )


def _raw_or_jp2(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(12)
    return head.startswith(b"\xff\x4f\xff\x51") or head[4:8] == b"jP  "


def _error(
    path: str, kind: str, reason: str, info: dict[str, Any] | None = None
) -> list[ImageFrame]:
    return [ImageFrame(path=path, status="error", reason=reason, kind=kind, info=info or {})]


def read_raster(
    path: str | Path, kind: str, *, limits: ReadLimits | None = None, decode: bool = True
) -> list[ImageFrame]:
    """Read a PNG/JPEG/TIFF/JPEG 2000 file into one frame per page, never raising."""
    shown, p = str(path), Path(path)
    limits = limits or ReadLimits()
    fmt = _FORMAT_NAMES.get(kind, kind.upper())
    try:
        size = p.stat().st_size
    except OSError as exc:
        return _error(shown, kind, f"cannot open file: {exc.strerror or exc}")
    if size == 0:
        return _error(shown, kind, "empty file (0 bytes) — the transfer or export failed")
    if size > limits.max_file_bytes:
        return _error(shown, kind, f"file is {size} bytes, over the {limits.max_file_bytes} limit")
    info: dict[str, Any] = {
        "modality": "",
        "photometric": "",
        "transfer_syntax": fmt,
        "bits_stored": None,
        "rows": None,
        "columns": None,
        "n_frames": 1,
        "sop_class": "",
        "voi": "full container range",
        "file_size": size,
    }
    try:
        width, height, pages, orientation = _header(p)
    except Exception as exc:  # noqa: BLE001 - unreadable header → error row
        return _error(shown, kind, f"corrupt or unsupported {fmt} file: {str(exc)[:160]}", info)
    info.update(rows=height, columns=width, n_frames=pages)
    if orientation != 1:
        info["exif_orientation"] = orientation
    if pages > limits.max_frames:
        return _error(shown, kind, f"{pages} pages exceed the limit of {limits.max_frames}", info)
    if width * height * pages > limits.max_pixels:
        return _error(
            shown,
            kind,
            f"image too large: {height}×{width}×{pages} pages over the limit of "
            f"{limits.max_pixels} pixels",
            info,
        )
    image_id = file_image_id(p)
    if not decode:
        return _frames(shown, kind, image_id, [None] * pages, info)
    try:
        truncated = truncation_reason(p, kind, size)
    except OSError as exc:
        return _error(shown, kind, f"cannot read file: {exc.strerror or exc}", info)
    if truncated:
        return _error(shown, kind, truncated, info)
    try:
        with decoder_messages() as printed:
            decoded = _decode(p, pages)
    except Exception as exc:  # noqa: BLE001 - OpenCV raises cv2.error on some corrupt files
        return _error(shown, kind, f"cannot decode {fmt} file: {str(exc)[:160]}", info)
    if printed.summary():
        # A decoder that complains has made up (part of) the image: never score it.
        return _error(
            shown, kind, f"corrupt {fmt} file: the decoder reported: {printed.summary()}", info
        )
    if not decoded:
        return _error(shown, kind, f"cannot decode {fmt} file (corrupt or truncated?)", info)
    info["bits_stored"] = int(decoded[0].dtype.itemsize * 8)
    info["photometric"] = "RGB" if decoded[0].ndim == 3 and decoded[0].shape[2] >= 3 else "GREY"
    images: list[np.ndarray | None] = []
    colour: list[float] = []
    for arr in decoded:
        colour.append(colour_fraction(arr))
        img = _to_float(arr, info)
        op = _ORIENT_OPS.get(orientation)
        images.append(np.ascontiguousarray(op(img) if op else img, dtype=np.float32))
    return _frames(shown, kind, image_id, images, info, colour)


def _decode(p: Path, pages: int) -> list[np.ndarray]:
    """All pages of an image file. OpenCV takes its path as UTF-8 text: a name that is not valid
    UTF-8 (bytes a POSIX file system allows) is decoded from memory instead."""
    try:
        name: str | None = str(p)
        name.encode("utf-8")  # type: ignore[union-attr]
    except UnicodeEncodeError:
        name = None
    if name is None:
        buf = np.fromfile(p, np.uint8)
        if pages > 1:
            ok, many = cv2.imdecodemulti(buf, cv2.IMREAD_UNCHANGED)
            return list(many) if ok else []
        one = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        return [] if one is None else [one]
    if pages > 1:
        ok, many = cv2.imreadmulti(name, flags=cv2.IMREAD_UNCHANGED)
        return list(many) if ok else []
    one = cv2.imread(name, cv2.IMREAD_UNCHANGED)
    return [] if one is None else [one]


def _frames(
    shown: str,
    kind: str,
    image_id: str,
    images: list[np.ndarray | None],
    info: dict[str, Any],
    colour: list[float] | None = None,
) -> list[ImageFrame]:
    multi = len(images) > 1
    return [
        ImageFrame(
            path=shown,
            frame=i,
            status="ok",
            kind=kind,
            image=img,
            image_id=image_id + (f":{i}" if multi else ""),
            body_part="unknown",
            body_part_reason=f"{_FORMAT_NAMES.get(kind, kind)} files carry no body part",
            info=dict(info, colour_fraction=colour[i]) if colour else dict(info),
        )
        for i, img in enumerate(images)
    ]
