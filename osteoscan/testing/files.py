"""DICOM and PNG files for tests and demos, written from synthetic (or given) images.

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
    "BASIC_TEXT_SR",
    "encode_stored",
    "write_dicom",
    "write_structured_report",
    "write_png",
    "invert_monochrome",
]

# Transfer syntaxes written as native (uncompressed) pixel data.
_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")


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
    if arr.ndim - (1 if colour else 0) not in (2, 3):
        raise ValueError(f"image must be 2-D or 3-D (frames), got shape {arr.shape}")
    # Compensate every inversion a reader will apply, so the displayed image equals `image`.
    inverse = photometric.upper() == "MONOCHROME1" or (
        (presentation_lut_shape or "").upper() == "INVERSE"
    )
    pixels = _stored_pixels(arr, bits_stored, signed, invert=inverse != (rescale_slope < 0))
    ds = _base_dataset(sop_class_uid, sop_instance_uid, transfer_syntax, modality)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    optional = {
        "PatientBirthDate": patient_birth_date,
        "PatientAge": patient_age,
        "PatientSex": patient_sex,
        "StudyDate": study_date,
        "BodyPartExamined": body_part,
        "StudyDescription": study_description or None,
        "SeriesDescription": series_description or None,
        "ProtocolName": protocol_name or None,
        "PresentationLUTShape": presentation_lut_shape,
    }
    for keyword, value in optional.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.ContentDate = study_date or "20240115"
    _set_image_pixel_module(ds, pixels, photometric, colour, bits_stored, signed)
    if rescale_slope != 1.0 or rescale_intercept != 0.0:
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleType = "US"
    _set_voi(ds, window, voi_lut)
    ts = _set_pixel_data(ds, pixels, UID(transfer_syntax), preamble, j2k_cr)
    return _save(Path(path), ds, ts, preamble)


def _stored_pixels(arr: np.ndarray, bits_stored: int, signed: bool, invert: bool) -> np.ndarray:
    """Stored values in their container dtype: floats encoded over the stored range, integers
    verbatim."""
    if np.issubdtype(arr.dtype, np.floating):
        arr = encode_stored(arr, bits_stored=bits_stored, signed=signed, invert=invert)
    bits_allocated = 8 if bits_stored <= 8 else 16
    return np.ascontiguousarray(arr.astype(_container_dtype(bits_allocated, signed)))


def _set_image_pixel_module(
    ds: Dataset, pixels: np.ndarray, photometric: str, colour: bool, bits_stored: int, signed: bool
) -> None:
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    if pixels.ndim - (1 if colour else 0) == 3:
        ds.NumberOfFrames = int(pixels.shape[0])
    ds.Rows = int(pixels.shape[-3 if colour else -2])
    ds.Columns = int(pixels.shape[-2 if colour else -1])
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _set_voi(
    ds: Dataset,
    window: tuple[float, float] | None,
    voi_lut: np.ndarray | tuple[int, np.ndarray] | None,
) -> None:
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    if voi_lut is None:
        return
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


def _set_pixel_data(
    ds: Dataset, pixels: np.ndarray, ts: UID, preamble: bool, j2k_cr: Sequence[float] | None
) -> UID:
    """Store ``pixels`` natively or encoded with ``ts``; returns the transfer syntax used."""
    if not preamble:
        if ts not in _NATIVE:
            raise ValueError("preamble=False writes a bare implicit VR dataset: native pixels only")
        ts = ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = ts
    if ts in _NATIVE:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if pixels.dtype.itemsize > 1 else "OB"
    else:
        kwargs: dict = {"generate_instance_uid": False}
        if ts == JPEG2000:
            kwargs["j2k_cr"] = list(j2k_cr or [5])
        ds.compress(ts, pixels, **kwargs)
    return ts


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
