"""Only projection radiographs are scored: the gate every frame passes before routing.

A hospital archive is mostly CT, MR and ultrasound. None of it is a knee or spine radiograph, yet
a DICOM without ``BodyPartExamined`` would otherwise be routed to the knee model like any other.
:func:`decide` looks at one ``ok`` frame from the readers and returns a :class:`Decision`: a
:class:`GateCode` (code decides on codes, never on the reason text) and a reason a person
understands.

**DICOM** — the header decides, before any pixel is looked at:

1. ``Modality`` CR, DX (and the vendor spelling DR, and RG) goes on, unless the SOP class is
   that of another kind of image, the image is *for processing* (raw detector data, not meant to
   be viewed), ``ImageType`` marks a screen capture, or the pixel data are colour.
2. Any other modality is skipped with its name: CT, MR, US, NM, PT, XA/RF (cine), MG, dental,
   photographs… A secondary capture (``OT`` or a Secondary Capture SOP class) is a picture of a
   screen unless ``ConversionType`` says digitized film; colour captures are always skipped.
3. No ``Modality`` at all: a CR or DX SOP class goes on (the SOP class fixes the IOD, and
   ``Modality`` is Type 1 there, so its absence is a damaged or over-anonymised header, not a
   different kind of image). Anything else without a modality is skipped: we cannot tell it is a
   radiograph, and scoring a CT screenshot as a knee (and flagging it) is worse than a skipped row
   that says how to fix the header.

**PNG, JPEG, TIFF, JPEG 2000** carry no modality. A cheap content check skips what is *clearly*
not a radiograph: colour pictures, (almost) uniform images, images with only a handful of grey
levels (drawings, charts, screen captures of text) and almost entirely white pages. It is tuned to
never skip a real radiograph (measured on every real knee radiograph in ``../shared/data``: no
false skip) and therefore lets through greyscale pictures with a radiograph's grey-level
structure: greyscale screenshots of CT, MR or ultrasound, inverted radiographs, photographs
converted to grey.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from pydicom.uid import UID

from osteoscan.frames import ImageFrame
from osteoscan.inert import dicom_value, valid_uid
from osteoscan.quantiles import integer_levels, level_values, percentiles_from_counts

__all__ = ["GateCode", "Decision", "decide", "dicom_decision", "content_decision"]

RASTER_KINDS = ("png", "jpeg", "tiff", "jpeg2000")
PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
SCORED = "only projection radiographs (CR, DX) are scored"

# Modalities that are certainly not knee/spine projection radiographs, with a name for people.
_MODALITY_NAMES: dict[str, str] = {
    "CT": "CT image",
    "MR": "MR image",
    "US": "ultrasound image",
    "IVUS": "intravascular ultrasound image",
    "NM": "nuclear medicine image",
    "PT": "PET image",
    "XA": "X-ray angiography (cine)",
    "RF": "fluoroscopy (cine)",
    "DF": "digital fluoroscopy (cine)",
    "MG": "mammogram",
    "IO": "intra-oral dental radiograph",
    "PX": "panoramic dental radiograph",
    "BMD": "bone densitometry (DXA) image",
    "ES": "endoscopy image",
    "XC": "photograph (external camera)",
    "GM": "microscopy image",
    "SM": "slide microscopy image",
    "OP": "ophthalmic photograph",
    "OPT": "ophthalmic tomography image",
    "RTIMAGE": "radiotherapy portal image",
    "OCT": "optical coherence tomography image",
    "TG": "thermography image",
}
_RADIOGRAPH_SOPS = frozenset({"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"})
_FOR_PROCESSING_SOPS = frozenset({"1.2.840.10008.5.1.4.1.1.1.1.1"})
_SECONDARY_SOPS = frozenset(
    {"1.2.840.10008.5.1.4.1.1.7"} | {f"1.2.840.10008.5.1.4.1.1.7.{i}" for i in range(1, 5)}
)
_SCREEN_TOKENS = frozenset({"SCREEN SAVE", "SCREENSHOT", "SCREEN CAPTURE", "SCREEN"})
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2", ""})

# Content check (PNG/JPEG/TIFF/J2K). Measured on 6,794 real knee radiographs: coloured-pixel
# fraction 0 (even the RGB JPEGs are grey), >= 131 grey levels, near-white <= 8 % of pixels.
COLOUR_FRACTION = 0.01  # share of pixels whose chroma exceeds 10 % of full scale
MIN_GREY_LEVELS = 24  # distinct levels of the 1-99 % range quantised to 256 steps
WHITE_FRACTION = 0.9  # share of pixels at >= 98 % of full scale
_SAMPLE_SIDE = 512  # the content check looks at a strided sample this big at most


class GateCode(str, Enum):
    """Why a frame passed or was stopped; the value is what ``inspect --json`` prints."""

    RADIOGRAPH = "radiograph"  # header: a projection radiograph modality
    RADIOGRAPH_SOP_CLASS = "radiograph_sop_class"  # no Modality, CR/DX SOP class
    DIGITIZED_FILM = "digitized_film"  # greyscale secondary capture of a scanned film
    CONTENT_PASSED = "content_passed"  # PNG/JPEG…: nothing in the content speaks against it
    MODALITY = "modality"  # CT, MR, US, NM, PT, XA/RF, MG, dental…
    SOP_CLASS = "sop_class"  # the SOP class is that of another kind of image
    SECONDARY_CAPTURE = "secondary_capture"  # a picture of a screen
    FOR_PROCESSING = "for_processing"  # raw detector data, not meant for viewing
    NO_MODALITY = "no_modality"  # nothing in the header says it is a radiograph
    COLOUR = "colour"  # colour pixel data
    UNIFORM = "uniform"  # (almost) one value everywhere
    FEW_GREY_LEVELS = "few_grey_levels"  # drawing, chart, text
    MOSTLY_WHITE = "mostly_white"  # a document or blank page

    @property
    def passed(self) -> bool:
        """True for the codes that let a frame go on to routing and scoring."""
        return self in _PASSING


_PASSING = frozenset(
    {
        GateCode.RADIOGRAPH,
        GateCode.RADIOGRAPH_SOP_CLASS,
        GateCode.DIGITIZED_FILM,
        GateCode.CONTENT_PASSED,
    }
)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one frame: ``code`` (decide on this) and ``reason`` (show this)."""

    code: GateCode
    reason: str

    @property
    def passed(self) -> bool:
        """True when the frame goes on to routing."""
        return self.code.passed


def _skip(code: GateCode, what: str) -> Decision:
    return Decision(code, f"{what}: {SCORED}")


def _sop_kind(sop: str) -> str:
    if sop in _RADIOGRAPH_SOPS:
        return "radiograph"
    if sop in _FOR_PROCESSING_SOPS:
        return "for_processing"
    if sop in _SECONDARY_SOPS:
        return "secondary"
    # A SOP class pydicom knows (CT Image Storage…) is a statement; an unknown/private one is not.
    return "other" if sop and UID(sop).name != sop else ""


def _colour(info: Mapping[str, Any]) -> str:
    """The photometric interpretation when the pixel data are colour, else ''."""
    photometric = _code(info, "photometric")
    samples = info.get("samples_per_pixel") or 1
    if photometric not in _GREY:
        return photometric
    return "RGB" if int(samples) > 1 else ""


def _code(info: Mapping[str, Any], key: str) -> str:
    """A header code from ``info``, checked as a DICOM CS (quoted in reasons: never raw)."""
    return dicom_value(info.get(key) or "", "CS").strip().upper()


def dicom_decision(info: Mapping[str, Any]) -> Decision:
    """The gate for a DICOM frame, from header facts only (the reader's ``info``).

    The reader checks header values against their VR; they are checked again here because
    every one of them may be quoted in the reason, and ``info`` may come from another reader.
    """
    modality = _code(info, "modality")
    raw_sop = str(info.get("sop_class_uid") or "").strip()
    sop = raw_sop if valid_uid(raw_sop) else ""
    kind = _sop_kind(sop)
    sop_name = UID(sop).name if sop else "none"
    colour = _colour(info)
    image_types = [dicom_value(v, "CS").strip() for v in info.get("image_type") or ()]
    image_type = {v.upper() for v in image_types}
    if modality in _MODALITY_NAMES:
        return _skip(GateCode.MODALITY, f"{_MODALITY_NAMES[modality]} (Modality={modality})")
    if kind == "other":
        return _skip(GateCode.SOP_CLASS, f"{sop_name} (Modality={modality or 'none'})")
    if colour:
        what = "colour secondary capture" if kind == "secondary" else "colour image"
        return _skip(
            GateCode.COLOUR,
            f"{what} (Modality={modality or 'none'}, PhotometricInterpretation={colour}); "
            "radiographs are greyscale",
        )
    processing = _code(info, "presentation_intent") == "FOR PROCESSING"
    if kind == "for_processing" or processing:
        return _skip(
            GateCode.FOR_PROCESSING,
            f"X-ray image 'for processing' (Modality={modality or 'none'}): raw detector data, "
            "not meant for viewing; export the 'for presentation' image",
        )
    if image_type & _SCREEN_TOKENS:
        shown = "\\".join(image_types)
        return _skip(GateCode.SECONDARY_CAPTURE, f"screen capture (ImageType={shown})")
    if modality in PROJECTION_MODALITIES:
        return Decision(GateCode.RADIOGRAPH, f"projection radiograph (Modality={modality})")
    if kind == "radiograph":
        # Also a non-standard Modality (OT, XR…) with a CR/DX SOP class: the SOP class is the IOD.
        return Decision(
            GateCode.RADIOGRAPH_SOP_CLASS,
            f"projection radiograph by SOP class ({sop_name}; Modality={modality or 'none'})",
        )
    if kind == "secondary" or modality == "OT":
        conversion = _code(info, "conversion_type") or "none"
        if conversion == "DF":
            return Decision(
                GateCode.DIGITIZED_FILM, "digitized film (secondary capture, ConversionType=DF)"
            )
        return _skip(
            GateCode.SECONDARY_CAPTURE,
            f"secondary capture (Modality={modality or 'none'}, ConversionType={conversion}): "
            "a picture of a screen or document, not an original radiograph",
        )
    if modality:
        return _skip(GateCode.MODALITY, f"Modality={modality} is not a projection radiograph")
    # No Modality and no CR/DX SOP class: conservative. A wrongly skipped radiograph is a visible
    # row with a fix in its reason; a CT or ultrasound capture scored as a knee is a silent,
    # possibly flagged, wrong result.
    return _skip(
        GateCode.NO_MODALITY,
        f"no Modality in the header and SOP class {sop_name}: nothing says this is a radiograph "
        "(set Modality to CR or DX if it is one)",
    )


def _sample(image: np.ndarray) -> np.ndarray:
    step = max(1, -(-max(image.shape[:2]) // _SAMPLE_SIDE))
    return np.asarray(image[::step, ::step], dtype=np.float32)


_GRIDS = {"0..255": 255, "0..65535": 65535}  # the raster reader's info["range"] → levels


def _content_stats(s: np.ndarray, info: Mapping[str, Any]) -> tuple[float, float, int, float]:
    """(1st percentile, 99th percentile, grey levels, white fraction) of the sample ``s``.

    For an 8- or 16-bit raster the sample holds at most 256 (65536) distinct values: all four
    come from one count of its integer levels, with the same arithmetic per distinct value as
    per pixel (identical results, ~5x quicker than partitioning for the percentiles).
    """
    top = 0 if "colour" in info else _GRIDS.get(str(info.get("range") or ""), 0)
    levels = integer_levels(s, top) if top else None
    if levels is None:  # any other image: the plain per-pixel computation
        lo, hi = (float(v) for v in np.percentile(s, [1, 99]))
        if hi - lo < 1e-7:
            return lo, hi, 0, 0.0
        quantised = np.rint(np.clip((s - lo) / (hi - lo), 0, 1) * 255).astype(np.intp)
        n_levels = int(np.count_nonzero(np.bincount(quantised.ravel(), minlength=256)))
        return lo, hi, n_levels, float(np.mean(s >= 0.98))
    all_counts = np.bincount(levels.ravel(), minlength=top + 1)
    present = np.flatnonzero(all_counts)
    values, counts = level_values(top)[present], all_counts[present]
    lo, hi = (float(v) for v in percentiles_from_counts(values, counts, [1, 99]))
    if hi - lo < 1e-7:
        return lo, hi, 0, 0.0
    quantised = np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.intp)
    white = int(counts[values >= 0.98].sum()) / int(s.size)
    return lo, hi, int(np.unique(quantised).size), white


def content_decision(image: np.ndarray, info: Mapping[str, Any]) -> Decision:
    """The gate for a PNG/JPEG/TIFF/JPEG 2000 frame: a cheap look at its pixels.

    ``image`` is the reader's float (H, W) image in [0, 1]; ``info["colour_fraction"]`` is the
    share of coloured pixels the raster reader measured before converting to grey.
    """
    colour = float(info.get("colour_fraction") or 0.0)
    if colour >= COLOUR_FRACTION:
        return _skip(
            GateCode.COLOUR,
            f"colour picture ({colour:.0%} of its pixels are coloured); radiographs are greyscale",
        )
    lo, hi, levels, white = _content_stats(_sample(image), info)
    if hi - lo < 1e-7:
        return _skip(
            GateCode.UNIFORM,
            "almost uniform image (at least 98% of its pixels have one value): blank or a "
            "failed export",
        )
    if levels < MIN_GREY_LEVELS:
        return _skip(
            GateCode.FEW_GREY_LEVELS,
            f"only {levels} grey levels: a drawing, chart or screen capture, not a radiograph",
        )
    if white >= WHITE_FRACTION:
        return _skip(
            GateCode.MOSTLY_WHITE,
            f"almost entirely white ({white:.0%} of its pixels): a document or blank page",
        )
    return Decision(
        GateCode.CONTENT_PASSED,
        "content check passed: greyscale with a radiograph's range of grey levels (no modality "
        "in this format)",
    )


def decide(frame: ImageFrame) -> Decision:
    """The gate's decision on one ``ok`` frame (with pixels) from the readers."""
    if frame.kind == "dicom":
        return dicom_decision(frame.info)
    if frame.kind in RASTER_KINDS and frame.image is not None:
        return content_decision(frame.image, frame.info)
    # Unknown kind (a stand-in reader, a future format): nothing to go on; the header rule for
    # DICOM applies when the record says it has a modality.
    if frame.info.get("modality"):
        return dicom_decision(frame.info)
    return Decision(GateCode.CONTENT_PASSED, "no modality and no pixels to check")
