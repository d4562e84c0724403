"""Synthetic radiographs and DICOM files for tests, demos and benchmarks.

Nothing here is medical data. :func:`synthetic_knee` draws a radiograph-like AP knee (femur and
tibia shafts, condyles, joint space, fibula, soft tissue) whose *trabecular texture* is controlled
by ``density``: ``1.0`` gives dense, fine, well-connected trabeculae and a thick cortex; ``0.3``
gives sparse, coarse, broken trabeculae and a thin cortex, as in osteoporosis. A small CNN can
learn the classes from texture alone. Everything is deterministic by ``seed``.

:func:`write_dicom` writes a float image (or raw stored integers) as a DICOM file with the
requested photometric interpretation, bit depth, signedness, rescale, windowing, VOI LUT and
transfer syntax. For *float* input the stored values are encoded so that a correct reader
(modality LUT → VOI → MONOCHROME1/INVERSE inversion, see :mod:`osteoscan.readers.pixels`) displays
the *same* bone-bright image: MONOCHROME1, ``PresentationLUTShape = INVERSE`` and negative rescale
slopes are all compensated. Integer input is stored verbatim, for tests that need exact raw values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "synthetic_knee",
    "synthetic_chest",
    "encode_stored",
    "write_dicom",
    "write_structured_report",
    "write_png",
    "invert_monochrome",
]

# Transfer syntaxes written as native (uncompressed) pixel data.
_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")


def _blur(img: np.ndarray, sx: float, sy: float | None = None) -> np.ndarray:
    sy = sx if sy is None else sy
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sx), sigmaY=float(sy))


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _trabeculae(
    h: int, w: int, density: float, rng: np.random.Generator, scale: float
) -> np.ndarray:
    """Network of bright plates/rods in [0, 1].

    The zero crossings of band-pass filtered noise form a connected cellular network. Dense bone:
    small cells (fine spacing), thick-ish struts everywhere. Porotic bone: larger cells, thinner
    struts, and whole regions of struts removed (loss of connectivity). Blur is anisotropic
    because weight-bearing trabeculae run mostly along the bone axis.
    """
    d = float(np.clip(density, 0.05, 1.5))
    sigma = scale * (1.0 + 2.2 * (1.0 - min(d, 1.0)))  # cell size grows as density falls
    noise = rng.standard_normal((h, w)).astype(np.float32)
    band = _blur(noise, sigma, 1.8 * sigma) - _blur(noise, 2.0 * sigma, 3.6 * sigma)
    band /= float(band.std()) + 1e-8
    width = 0.18 + 0.22 * min(d, 1.0)  # strut thickness
    struts = np.exp(-((band / width) ** 2))
    # Connectivity loss: a smooth random field removes struts where it is below a threshold that
    # rises as density falls (no removal at density >= 1).
    field = _blur(rng.standard_normal((h, w)).astype(np.float32), 4.0 * sigma)
    field /= float(field.std()) + 1e-8
    keep = _smoothstep(-0.3, 0.3, field + 2.0 * (min(d, 1.0) - 0.4))
    return (struts * keep).astype(np.float32)


def _leg(
    yy: np.ndarray, xx: np.ndarray, cx: float, jit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-tissue, bone and joint-space masks (floats in [0,1]) for one knee centred at ``cx``."""
    dx = xx - cx
    # Soft tissue: a vertical column, widest at the joint.
    half = 0.20 + 0.05 * np.exp(-(((yy - 0.5) / 0.2) ** 2)) + jit[0]
    soft = 1.0 - _smoothstep(half - 0.02, half + 0.02, np.abs(dx))
    joint_y = 0.50 + jit[1]
    # Femur: shaft flaring into the metaphysis; the distal end is two rounded condyles.
    fem_hw = 0.075 + jit[2] + 0.085 * _smoothstep(joint_y - 0.22, joint_y - 0.04, yy)
    condyle_bottom = joint_y - 0.015 - 0.025 * np.cos(np.clip(dx / 0.16, -1.6, 1.6) * np.pi) ** 2
    condyle_bottom += 0.04 * _smoothstep(0.12, 0.17, np.abs(dx))
    femur = (np.abs(dx) < fem_hw) & (yy < condyle_bottom)
    # Tibia: plateau just below the joint space, narrowing into the shaft.
    plateau = joint_y + 0.015 + 0.006 * np.cos(dx / 0.16 * np.pi)
    tib_hw = 0.07 + jit[3] + 0.09 * (1.0 - _smoothstep(plateau + 0.02, plateau + 0.2, yy))
    tibia = (np.abs(dx) < tib_hw) & (yy > plateau)
    # Fibula: thin lateral shaft with a small head below the plateau.
    fib_cx = cx + np.sign(jit[4] + 1e-9) * 0.13
    fib_hw = 0.018 + 0.012 * np.exp(-(((yy - (plateau + 0.07)) / 0.04) ** 2))
    fibula = (np.abs(xx - fib_cx) < fib_hw) & (yy > plateau + 0.04)
    # Patella: faint ellipse superimposed on the femoral condyles (AP view).
    patella = (((dx - jit[5]) / 0.06) ** 2 + ((yy - (joint_y - 0.07)) / 0.075) ** 2) < 1.0
    bone = (femur | tibia | fibula).astype(np.float32)
    return soft.astype(np.float32), bone, patella.astype(np.float32)


def synthetic_knee(
    size: int = 256, seed: int = 0, density: float = 1.0, both_knees: bool = False
) -> np.ndarray:
    """A radiograph-like AP knee, float32 (size, size) in [0, 1], bone bright.

    ``density`` scales the trabecular texture (1.0 dense and fine, 0.3 sparse and coarse) as well
    as cortical thickness and bone brightness, the way mineral loss shows on a radiograph.
    ``both_knees`` draws two legs side by side (a bilateral standing view). Deterministic by
    ``seed``: the same arguments always give the same array.
    """
    size = int(size)
    if size < 16:
        raise ValueError("size must be >= 16")
    d = float(density)
    rng = np.random.default_rng([int(seed), 0x05_7E_05])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    scale = size / 256.0  # texture and blur scale with resolution
    centres = [0.27, 0.73] if both_knees else [0.5 + rng.uniform(-0.03, 0.03)]
    shrink = 0.55 if both_knees else 1.0

    soft = np.zeros((size, size), np.float32)
    bone = np.zeros_like(soft)
    patella = np.zeros_like(soft)
    for cx in centres:
        jit = rng.uniform(-0.012, 0.012, size=6).astype(np.float32)
        # Shrinking the horizontal coordinate narrows each leg for the bilateral view.
        s, b, p = _leg(yy, cx + (xx - cx) / shrink, cx, jit)
        soft, bone, patella = np.maximum(soft, s), np.maximum(bone, b), np.maximum(patella, p)

    # Cortex: a bright rim whose thickness falls with density (cortical thinning).
    bone_u8 = (bone > 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(bone_u8, cv2.DIST_L2, 3).astype(np.float32)
    cortex_px = max(1.0, scale * (2.0 + 3.5 * min(max(d, 0.0), 1.2)))
    cortex = bone * (1.0 - _smoothstep(cortex_px * 0.6, cortex_px, dist))
    # Cortex is thickest along the shafts; soften it in the epiphyses (spongy ends).
    trab = _trabeculae(size, size, d, rng, 1.3 * scale)

    img = 0.03 + 0.20 * soft
    img += bone * (0.22 + 0.10 * min(d, 1.2))  # marrow/background bone brightness
    img += bone * trab * (0.10 + 0.22 * min(d, 1.2))
    img += cortex * (0.18 + 0.17 * min(d, 1.2))
    img += 0.05 * patella * soft
    # Soft tissue is thicker in the middle of the column: a slow vertical and lateral gradient.
    img += 0.03 * soft * np.cos((xx - 0.5) * np.pi) * (0.7 + 0.3 * yy)
    img = _blur(img.astype(np.float32), 0.6 * scale)
    img += rng.normal(0.0, 0.008, img.shape).astype(np.float32)  # quantum noise
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def synthetic_chest(size: int = 256, seed: int = 0) -> np.ndarray:
    """A radiograph-like PA chest (lungs, mediastinum, spine, ribs), float32 in [0, 1]."""
    size = int(size)
    rng = np.random.default_rng([int(seed), 0xC4E57])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    body = 1.0 - _smoothstep(0.40, 0.46, np.abs(xx - 0.5))
    img = 0.05 + 0.45 * body
    for side in (-1.0, 1.0):
        cx = 0.5 + side * (0.19 + rng.uniform(-0.01, 0.01))
        lung = ((xx - cx) / 0.14) ** 2 + ((yy - 0.48) / 0.32) ** 2 < 1.0
        img -= 0.28 * _blur(lung.astype(np.float32), 2.0)
        # Ribs: curved bright bands across each lung field.
        for k in range(9):
            y0 = 0.2 + 0.07 * k
            rib = np.abs(yy - (y0 + 0.25 * (xx - cx) ** 2 * 4 * side * (xx - cx))) < 0.012
            img += 0.10 * (rib & (np.abs(xx - cx) < 0.18)).astype(np.float32)
    spine = np.abs(xx - 0.5) < 0.04
    img += 0.25 * spine.astype(np.float32)
    heart = ((xx - 0.54) / 0.12) ** 2 + ((yy - 0.62) / 0.11) ** 2 < 1.0
    img += 0.15 * heart.astype(np.float32)
    img = _blur(img.astype(np.float32), 1.0 * size / 256)
    img += rng.normal(0.0, 0.008, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def encode_stored(
    image: np.ndarray, *, bits_stored: int = 12, signed: bool = False, invert: bool = False
) -> np.ndarray:
    """Map a float image in [0, 1] onto the full stored range of ``bits_stored``/``signed``.

    ``invert`` stores ``1 - image`` (used for MONOCHROME1, INVERSE and negative slopes).
    """
    img = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if invert:
        img = 1.0 - img
    lo, hi = _stored_range(bits_stored, signed)
    out = np.rint(lo + img * (hi - lo))
    return out.astype(np.int32 if signed else np.uint32)


def _container_dtype(bits_allocated: int, signed: bool) -> np.dtype:
    return np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")


def _base_dataset(
    sop_class_uid: str, sop_instance_uid: str | None, transfer_syntax: str, modality: str
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid or generate_uid())
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1499.1")
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    return ds


def _save(path: Path, ds: Dataset, transfer_syntax: str, preamble: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = UID(transfer_syntax)
    implicit = ts == ImplicitVRLittleEndian
    little = ts != ExplicitVRBigEndian
    if preamble:
        ds.preamble = b"\x00" * 128
        pydicom.dcmwrite(
            path, ds, enforce_file_format=True, implicit_vr=implicit, little_endian=little
        )
    else:
        # A "raw" dataset as some old PACS exports write it: no 128-byte preamble, no "DICM",
        # no file meta group, implicit VR little endian.
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | tuple[int, np.ndarray] | None = None,
    modality: str = "DX",
    body_part: str | None = "KNEE",
    study_description: str = "",
    series_description: str = "",
    protocol_name: str = "",
    patient_age: str | None = "065Y",
    patient_sex: str | None = "F",
    patient_birth_date: str | None = None,
    study_date: str | None = "20240115",
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID-0001",
    sop_instance_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
    presentation_lut_shape: str | None = None,
    sop_class_uid: str = DigitalXRayImageStorageForPresentation,
    j2k_cr: Sequence[float] | None = None,
) -> Path:
    """Write ``image`` as a DICOM file and return its path.

    ``image``: float in [0, 1] (bone bright, the image a correct reader must display) or integers
    (stored verbatim); shape (H, W), (F, H, W) for multi-frame, or (..., 3) with
    ``photometric="RGB"``. ``window`` is (center, width) in modality units; ``voi_lut`` is LUT data
    (first mapped value 0) or ``(first_mapped, data)``. ``transfer_syntax`` may be any native
    syntax, or JPEG 2000 (lossless/lossy; ``j2k_cr`` compression ratios for lossy, default 5),
    RLE Lossless or JPEG-LS, which are encoded with pydicom's encoder plugins.
    ``preamble=False`` writes a bare implicit-VR dataset without preamble, ``DICM`` or file meta.
    """
    arr = np.asarray(image)
    colour = photometric.upper() in {"RGB", "YBR_FULL"}
    n_dims = arr.ndim - (1 if colour else 0)
    if n_dims not in (2, 3):
        raise ValueError(f"image must be 2-D or 3-D (frames), got shape {arr.shape}")
    bits_allocated = 8 if bits_stored <= 8 else 16
    if np.issubdtype(arr.dtype, np.floating):
        # Compensate every inversion a reader will apply, so the displayed image equals `image`.
        inverse = photometric.upper() == "MONOCHROME1" or (
            (presentation_lut_shape or "").upper() == "INVERSE"
        )
        invert = inverse != (rescale_slope < 0)
        stored = encode_stored(arr, bits_stored=bits_stored, signed=signed, invert=invert)
    else:
        stored = arr
    pixels = np.ascontiguousarray(stored.astype(_container_dtype(bits_allocated, signed)))

    ds = _base_dataset(sop_class_uid, sop_instance_uid, transfer_syntax, modality)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if patient_birth_date is not None:
        ds.PatientBirthDate = patient_birth_date
    if patient_age is not None:
        ds.PatientAge = patient_age
    if patient_sex is not None:
        ds.PatientSex = patient_sex
    if study_date is not None:
        ds.StudyDate = study_date
    ds.ContentDate = study_date or "20240115"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    for keyword, value in (
        ("StudyDescription", study_description),
        ("SeriesDescription", series_description),
        ("ProtocolName", protocol_name),
    ):
        if value:
            setattr(ds, keyword, value)
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    if n_dims == 3:
        ds.NumberOfFrames = int(pixels.shape[0])
    ds.Rows, ds.Columns = (
        int(pixels.shape[-3 if colour else -2]),
        int(pixels.shape[-2 if colour else -1]),
    )
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale_slope != 1.0 or rescale_intercept != 0.0:
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    if voi_lut is not None:
        first, data = voi_lut if isinstance(voi_lut, tuple) else (0, voi_lut)
        data = np.asarray(data, dtype=np.uint16)
        item = Dataset()
        n = len(data)
        bits = max(8, int(np.ceil(np.log2(max(int(data.max()), 1) + 1))))
        item.LUTDescriptor = [n if n < 65536 else 0, int(first), bits]
        item.LUTData = data.tolist()
        item["LUTData"].VR = "US"
        item.LUTExplanation = "synthetic"
        ds.VOILUTSequence = DicomSequence([item])
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape

    ts = UID(transfer_syntax)
    if not preamble:
        if ts not in _NATIVE:
            raise ValueError("preamble=False writes a bare implicit VR dataset: native pixels only")
        ts = ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = ts
    if ts in _NATIVE:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    else:
        kwargs: dict = {"generate_instance_uid": False}
        if ts == JPEG2000:
            kwargs["j2k_cr"] = list(j2k_cr or [5])
        ds.compress(ts, pixels, **kwargs)
    return _save(Path(path), ds, ts, preamble)


def write_structured_report(
    path: str | Path, *, text: str = "No acute abnormality.", preamble: bool = True
) -> Path:
    """Write a Basic Text SR (a DICOM object with no pixels) — readers must skip it."""
    ds = _base_dataset(BASIC_TEXT_SR, None, ExplicitVRLittleEndian, "SR")
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PID-0001"
    ds.StudyDate = "20240115"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "121070"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Findings"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = text
    ds.ContentSequence = DicomSequence([item])
    return _save(Path(path), ds, ExplicitVRLittleEndian, preamble)


def write_png(path: str | Path, image: np.ndarray, bits: int = 16) -> Path:
    """Write a float [0, 1] image as an 8- or 16-bit greyscale PNG (full range)."""
    if bits not in (8, 16):
        raise ValueError("bits must be 8 or 16")
    top = (1 << bits) - 1
    data = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 1) * top)
    data = data.astype(np.uint16 if bits == 16 else np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")
    return path


def invert_monochrome(src: str | Path, dst: str | Path) -> Path:
    """Copy a MONOCHROME1 DICOM as MONOCHROME2 with inverted stored values (same anatomy).

    The window centre is mirrored too, so that a reader applying the DICOM LINEAR window function
    (PS3.3 C.11.2.1.2, with its ``c - 0.5`` and ``w - 1`` terms) gives exactly the same displayed
    image for both files: with modality values ``m' = K - m`` the centre becomes ``K + 1 - c``.
    """
    ds = pydicom.dcmread(src)
    if ds.PhotometricInterpretation != "MONOCHROME1":
        raise ValueError("source is not MONOCHROME1")
    arr = ds.pixel_array
    lo, hi = _stored_range(int(ds.BitsStored), bool(ds.PixelRepresentation))
    inv = (hi + lo - arr.astype(np.int64)).astype(arr.dtype)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if "WindowCenter" in ds:
        centres = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
        # m = s*x + b and x' = hi+lo-x give m' = K - m with K = s*(hi+lo) + 2b.
        mirror = [slope * (hi + lo) + 2 * intercept + 1 - float(c) for c in centres]
        ds.WindowCenter = [f"{m:g}" for m in mirror] if len(mirror) > 1 else f"{mirror[0]:g}"
    ds.PhotometricInterpretation = "MONOCHROME2"
    if "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = "IDENTITY"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(inv).tobytes()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
