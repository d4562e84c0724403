"""Pure pixel maths: stored values → modality values → VOI → display image (bone bright).

Order of operations (the DICOM PS3.4 grayscale pipeline):

1. **Stored range.** ``BitsStored`` and ``PixelRepresentation`` define the range of stored values
   (``[0, 2**b - 1]`` or ``[-2**(b-1), 2**(b-1) - 1]``), not the container dtype: a 12-bit image
   in a ``uint16`` container ranges 0..4095, and bits above ``HighBit`` are masked / sign-extended.
2. **Modality LUT.** ``RescaleSlope``/``RescaleIntercept`` (negative slopes included: the range end
   points are swapped, never assumed ordered), or a Modality LUT Sequence.
3. **VOI — one policy, the same in train and scan** (:func:`voi_policy`):

   a. a *VOI LUT Sequence* if present (first item): the vendor's own tone curve for this image;
   b. else the *first* ``WindowCenter``/``WindowWidth`` pair, with ``VOILUTFunction`` (LINEAR as
      default, LINEAR_EXACT, SIGMOID) exactly as PS3.3 C.11.2.1.2 defines them;
   c. else the *full output range of the modality LUT* over the stored range — never the image's
      own min/max. This keeps the mapping independent of image content (a burned-in marker or
      a collimator edge cannot change the contrast of the anatomy) and makes a 16-bit DICOM
      without a window give exactly the same image as a 16-bit PNG of the same pixels, which the
      PNG reader maps over its full depth. Contrast is then stretched by preprocessing
      (percentile normalisation), identically for every source.

   Why the header's choices first: the window or LUT is how the modality (or the technologist)
   says the image is meant to be seen; ignoring it would feed the model a different image than
   the radiologist read, and for CR/DX the raw range is often mostly empty.
4. **Inversion after VOI**: ``MONOCHROME1`` or ``PresentationLUTShape == INVERSE`` → ``1 - v``.
   The two are *not* applied twice: in the DX/MG/IO IODs ``INVERSE`` is *required* together with
   MONOCHROME1 and describes the same single inversion. Result: bone is always bright.

Everything here is a pure function over NumPy arrays so it can be tested without files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "VOI",
    "stored_range",
    "normalise_stored",
    "modality_lut",
    "modality_range",
    "apply_window",
    "apply_lut",
    "voi_policy",
    "apply_voi",
    "needs_inversion",
    "to_display",
    "luminance",
]

# ITU-R BT.601 luma weights (what YBR_FULL's Y channel is): RGB → grey.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class VOI:
    """The VOI transform chosen for one image.

    ``kind``: ``"lut"`` (``lut_first``, ``lut_data``, ``lut_bits``), ``"window"`` (``center``,
    ``width``, ``function``) or ``"range"`` (``low``, ``high`` in modality units).
    ``describe()`` is what ``inspect`` shows in the ``voi`` info key.
    """

    kind: str
    center: float = 0.0
    width: float = 1.0
    function: str = "LINEAR"
    low: float = 0.0
    high: float = 1.0
    lut_first: int = 0
    lut_data: np.ndarray | None = field(default=None, compare=False, repr=False)
    lut_bits: int = 16

    def describe(self) -> str:
        """Short human-readable description, e.g. ``window 550/1024 LINEAR``."""
        if self.kind == "lut":
            n = 0 if self.lut_data is None else len(self.lut_data)
            return f"VOI LUT sequence ({n} entries, {self.lut_bits} bit)"
        if self.kind == "window":
            return f"window {self.center:g}/{self.width:g} {self.function}"
        return f"full range {self.low:g}..{self.high:g}"


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """(min, max) of stored values for ``bits_stored`` bits, signed or not."""
    if not 1 <= bits_stored <= 32:
        raise ValueError(f"BitsStored {bits_stored} is outside 1..32")
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def normalise_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values as int64 within the BitsStored range.

    Masks bits above ``HighBit`` (some modalities put overlay or garbage bits there) and
    sign-extends signed values from ``bits_stored`` bits, whatever the container dtype is.
    """
    a = np.asarray(arr)
    if a.dtype.kind == "f":
        return a.astype(np.float64)
    out = a.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        sign = 1 << (bits_stored - 1)
        out = (out ^ sign) - sign
    return out


def modality_lut(
    arr: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    lut: tuple[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Modality values (float64): a Modality LUT ``(first_mapped, data)`` if given, else rescale.

    Values below/above the LUT's input range take its first/last entry (PS3.3 C.11.1).
    """
    a = np.asarray(arr, dtype=np.float64)
    if lut is not None:
        first, data = lut
        table = np.asarray(data, dtype=np.float64)
        idx = np.clip(np.rint(a).astype(np.int64) - int(first), 0, len(table) - 1)
        return table[idx]
    return a * float(slope) + float(intercept)


def modality_range(
    bits_stored: int,
    signed: bool,
    slope: float = 1.0,
    intercept: float = 0.0,
    lut: tuple[int, np.ndarray] | None = None,
) -> tuple[float, float]:
    """(low, high) of modality values over the stored range; ordered even for negative slopes."""
    if lut is not None:
        table = np.asarray(lut[1], dtype=np.float64)
        return float(table.min()), float(table.max())
    lo, hi = stored_range(bits_stored, signed)
    a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return (min(a, b), max(a, b))


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Window modality values to [0, 1] per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID).

    LINEAR keeps the standard's ``c - 0.5`` / ``w - 1`` terms so a window written for integer
    display values maps exactly as a DICOM viewer maps it.
    """
    v = np.asarray(values, dtype=np.float64)
    fn = (function or "LINEAR").strip().upper()
    if fn == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (v - center) / max(width, 1e-12)))
    if fn == "LINEAR_EXACT":
        w = max(width, 1e-12)
        return np.clip((v - center) / w + 0.5, 0.0, 1.0)
    # LINEAR: width < 1 is illegal; treat as 1 (a hard threshold) rather than divide by zero.
    w = max(width, 1.0)
    if w <= 1.0:
        return (v > center - 0.5).astype(np.float64)
    return np.clip((v - (center - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def apply_lut(values: np.ndarray, first: int, data: np.ndarray, bits: int) -> np.ndarray:
    """A VOI LUT table to [0, 1]: out-of-range inputs clamp to the end entries (PS3.3 C.11.2)."""
    table = np.asarray(data, dtype=np.float64)
    idx = np.clip(np.rint(values).astype(np.int64) - int(first), 0, len(table) - 1)
    # Some writers declare fewer bits than their data uses; never exceed [0, 1].
    top = max(float((1 << int(bits)) - 1), float(table.max()), 1.0)
    return table[idx] / top


def voi_policy(
    *,
    modality_low: float,
    modality_high: float,
    centers: list[float] | None = None,
    widths: list[float] | None = None,
    function: str | None = None,
    lut: tuple[int, np.ndarray, int] | None = None,
) -> VOI:
    """Choose the VOI transform: VOI LUT sequence → first window → full modality range.

    A window with a non-positive or missing width is ignored (falls through to the range).
    """
    if lut is not None and len(lut[1]) > 0:
        first, data, bits = lut
        return VOI(
            kind="lut",
            lut_first=int(first),
            lut_data=np.asarray(data).ravel(),
            lut_bits=int(bits),
        )
    if centers and widths and widths[0] is not None and float(widths[0]) > 0:
        return VOI(
            kind="window",
            center=float(centers[0]),
            width=float(widths[0]),
            function=(function or "LINEAR").strip().upper() or "LINEAR",
        )
    return VOI(kind="range", low=float(modality_low), high=float(modality_high))


def apply_voi(values: np.ndarray, voi: VOI) -> np.ndarray:
    """Modality values → [0, 1] (float64) with the chosen VOI transform."""
    if voi.kind == "lut":
        assert voi.lut_data is not None
        return apply_lut(values, voi.lut_first, voi.lut_data, voi.lut_bits)
    if voi.kind == "window":
        return apply_window(values, voi.center, voi.width, voi.function)
    span = voi.high - voi.low
    if span <= 0:
        return np.zeros(np.shape(values), dtype=np.float64)
    return np.clip((np.asarray(values, dtype=np.float64) - voi.low) / span, 0.0, 1.0)


def needs_inversion(photometric: str, presentation_lut_shape: str | None = None) -> bool:
    """True for MONOCHROME1 or ``PresentationLUTShape == INVERSE`` (one inversion, never two)."""
    pi = (photometric or "").strip().upper()
    shape = (presentation_lut_shape or "").strip().upper()
    return pi == "MONOCHROME1" or shape == "INVERSE"


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB → (...) grey with BT.601 weights, float64."""
    return np.asarray(rgb, dtype=np.float64) @ _LUMA


def to_display(
    stored: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    modality_table: tuple[int, np.ndarray] | None = None,
    centers: list[float] | None = None,
    widths: list[float] | None = None,
    voi_function: str | None = None,
    voi_table: tuple[int, np.ndarray, int] | None = None,
    presentation_lut_shape: str | None = None,
) -> tuple[np.ndarray, VOI]:
    """The whole grayscale pipeline for one frame: float32 (H, W) in [0, 1], bone bright.

    Returns the image and the :class:`VOI` applied (for ``info["voi"]``).
    """
    values = modality_lut(
        normalise_stored(stored, bits_stored, signed), slope, intercept, modality_table
    )
    low, high = modality_range(bits_stored, signed, slope, intercept, modality_table)
    voi = voi_policy(
        modality_low=low,
        modality_high=high,
        centers=centers,
        widths=widths,
        function=voi_function,
        lut=voi_table,
    )
    img = apply_voi(values, voi)
    if needs_inversion(photometric, presentation_lut_shape):
        img = 1.0 - img
    return img.astype(np.float32), voi
