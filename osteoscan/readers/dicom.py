"""DICOM files → :class:`~osteoscan.frames.ImageFrame` (one per frame), never raising.

Checks run cheapest first, so a bad file costs little and never hangs: file size → parse (pydicom,
``force=True`` so preamble-less files work) → is it a DICOM dataset at all → non-image SOP class
(skipped) → pixel data present → geometry against :class:`~osteoscan.frames.ReadLimits` (before
any decoding) → decoder installed for the transfer syntax → native pixel data long enough →
decode frame by frame → :func:`osteoscan.readers.pixels.to_display` (modality LUT → VOI →
MONOCHROME1 inversion). Per-frame rescale and window values of enhanced multi-frame objects
(functional groups) are honoured.

Header values are hostile data: every one that reaches a record (``info``, reasons, body part,
age, sex, ``image_id``) is read through :func:`osteoscan.header.header_text`, i.e. checked against
its VR and dropped or cut when it fails. ``image_id`` is the SOPInstanceUID only when that is a
valid UID; otherwise it is the content hash and the reason says so. A parser message quoted in a
reason is made inert (:func:`osteoscan.inert.log_safe`) and short.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from osteoscan import header
from osteoscan.frames import ImageFrame, ReadLimits, Status
from osteoscan.hashing import content_image_id
from osteoscan.inert import cap, log_safe, unquote, valid_uid
from osteoscan.readers import codecs, pixels
from osteoscan.readers.capture import decoder_messages

__all__ = ["read_dicom", "non_image_reason"]

# SOP class name fragments (pydicom UID names) and modalities of objects that carry no radiograph.
_NON_IMAGE_NAMES = (
    *("SR Storage", "Presentation State", "Key Object Selection", "Segmentation", "Encapsulated"),
    *("Waveform", "Raw Data", "Registration", "Spatial Fiducials", "Surface", "Real World Value"),
    *("Media Storage Directory", "Parametric Map", "Tractography", "Measurement"),
    "Storage Commitment",
)
_NON_IMAGE_MODALITIES = frozenset(
    ("SR", "PR", "KO", "SEG", "REG", "FID", "RWV", "DOC", "ECG", "HD", "AU", "PLAN")
    + ("RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTTREAT", "RTION")
)


def _error(path: str, reason: str, **kw: Any) -> list[ImageFrame]:
    return [ImageFrame(path=path, status="error", reason=reason, kind="dicom", **kw)]


INVALID_UID = "SOPInstanceUID is not a valid UID: image_id is the file's content hash"
_MESSAGE_CHARS = 160  # of a parser's message quoted in a reason


def _message(exc: BaseException, limit: int = _MESSAGE_CHARS) -> str:
    """A parser exception as inert, short text for a reason.

    Parsers quote the value they choked on (``invalid literal for int(): 'DOE^JANE'``), and in a
    corrupt file that value may be any element, a patient's name included: quoted values are
    left out.
    """
    return cap(log_safe(unquote(str(exc) or type(exc).__name__)), limit)


def _uid_name(uid: str) -> str:
    """The name of a (checked) UID: pydicom's name when known, else the UID itself."""
    return UID(uid).name if uid else ""


def non_image_reason(ds: Dataset) -> str:
    """Why ``ds`` is not an image object (empty string when it may be one)."""
    sop = header.header_text(ds, "SOPClassUID")
    name = _uid_name(sop)
    modality = header.header_text(ds, "Modality").upper()
    is_rt = name.startswith("RT ") and name != "RT Image Storage"
    if any(frag in name for frag in _NON_IMAGE_NAMES) or is_rt:
        return f"non-image DICOM object ({name}) — not a radiograph"
    if modality in _NON_IMAGE_MODALITIES:
        return f"non-image DICOM object (Modality {modality}) — not a radiograph"
    if "PixelData" not in ds and ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        return "floating-point pixel data (a parametric map) — not a radiograph"
    return ""


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        return default


def _floats(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = []
    for v in items:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        # A NaN/inf window or rescale value is corrupt: treat it as absent, not as maths to apply.
        if math.isfinite(f):
            out.append(f)
    return out


def _fix_transfer_syntax(ds: Dataset) -> str:
    """Transfer syntax UID, inferred from the encoding for preamble-less files without meta
    (or with a value that is not a UID)."""
    meta = getattr(ds, "file_meta", None)
    # checked: the name of an unknown syntax is the UID itself, shown in reasons and inspect
    uid = header.header_text(meta, "TransferSyntaxUID") if meta is not None else ""
    if uid:
        return uid
    implicit, little = ds.original_encoding
    uid = (
        ImplicitVRLittleEndian
        if implicit
        else (ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    )
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return str(uid)


def _group_item(ds: Dataset, frame: int, group: str) -> Dataset | None:
    """Functional group item (per-frame first, then shared) of an enhanced multi-frame object."""
    for seq_kw, idx in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(seq_kw)
        if seq and len(seq) > idx and group in seq[idx] and len(seq[idx][group].value) > 0:
            return seq[idx][group].value[0]
    return None


def _lut_from(item: Dataset, signed_input: bool) -> tuple[int, np.ndarray, int] | None:
    desc = item.get("LUTDescriptor")
    data = item.get("LUTData")
    if desc is None or data is None or len(desc) < 3:
        return None
    n, first, bits = int(desc[0]), int(desc[1]), int(desc[2])
    if signed_input and first > 32767:  # US-encoded negative first-mapped value
        first -= 65536
    arr = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)
    arr = np.asarray(arr).ravel()[: (n or 65536)]
    return (first, arr, bits) if arr.size else None


def _grey_params(ds: Dataset, frame: int) -> dict[str, Any]:
    """Modality/VOI parameters for one frame (enhanced functional groups win over top level)."""
    src: Dataset = ds
    signed = _int(ds, "PixelRepresentation", 0) == 1
    rescale = _group_item(ds, frame, "PixelValueTransformationSequence")
    slope = _floats((rescale or src).get("RescaleSlope"))
    intercept = _floats((rescale or src).get("RescaleIntercept"))
    voi_item = _group_item(ds, frame, "FrameVOILUTSequence") or src
    modality_table = None
    if "ModalityLUTSequence" in ds and not slope:
        lut = _lut_from(ds.ModalityLUTSequence[0], signed)
        modality_table = (lut[0], lut[1]) if lut else None
    voi_table = None
    if "VOILUTSequence" in voi_item and len(voi_item.VOILUTSequence) > 0:
        # A LUT's input is the modality value; negative first-mapped values arise when it can be.
        voi_table = _lut_from(
            voi_item.VOILUTSequence[0], signed or bool(intercept and intercept[0] < 0)
        )
    return {
        "slope": slope[0] if slope and slope[0] != 0 else 1.0,
        "intercept": intercept[0] if intercept else 0.0,
        "modality_table": modality_table,
        "centers": _floats(voi_item.get("WindowCenter")),
        "widths": _floats(voi_item.get("WindowWidth")),
        "voi_function": str(voi_item.get("VOILUTFunction", "") or "") or None,
        "voi_table": voi_table,
        "presentation_lut_shape": str(ds.get("PresentationLUTShape", "") or "") or None,
    }


def _expected_bytes(
    rows: int, cols: int, frames: int, spp: int, bits_alloc: int, photometric: str
) -> int:
    # Native YBR_FULL_422 stores two samples per pixel (chroma subsampled horizontally).
    n = rows * cols * frames * (2 if photometric == "YBR_FULL_422" else spp)
    return (n + 7) // 8 if bits_alloc == 1 else n * (bits_alloc // 8)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _empty_dataset_reason(ds: Dataset, size: int) -> str:
    """Why a parse gave no image elements: a fragment, a cut-short DICOM file, or not DICOM."""
    meta = getattr(ds, "file_meta", None)
    sop = header.header_text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    ts = header.header_text(meta, "TransferSyntaxUID") if meta is not None else ""
    if len(ds) > 0:
        return (
            "DICOM file without an image: none of SOPClassUID, Modality, Rows or PixelData is "
            "present (a fragment, or a damaged file)"
        )
    if sop or ts:
        # The Part 10 header was read, so this is a DICOM file whose data set could not be: in
        # practice a file cut short inside its (often compressed) pixel data.
        what = ", ".join(x for x in (_uid_name(sop), codecs.syntax_name(ts)) if x)
        return (
            f"truncated or corrupt DICOM file ({what}): its file header is readable but the data "
            f"set after it is not ({size} bytes; cut short during transfer?) — resend the file"
        )
    return "not a DICOM file: no DICOM data elements found (wrong file type?)"


def _frame_image(
    ds: Dataset, arr: np.ndarray, frame: int, bits_stored: int
) -> tuple[np.ndarray, str]:
    """One decoded frame → (display image, VOI description)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    signed = _int(ds, "PixelRepresentation", 0) == 1
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
        return np.clip(pixels.luminance(rgb) / top, 0, 1).astype(np.float32), "palette → luminance"
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # Colour (RGB, or YBR converted to RGB by pydicom): luminance, full stored range; DICOM
        # windowing applies to grayscale only.
        lo, hi = pixels.stored_range(bits_stored, False)
        grey = pixels.luminance(arr[..., :3])
        return np.clip((grey - lo) / (hi - lo), 0, 1).astype(
            np.float32
        ), "colour → luminance, full range"
    img, voi = pixels.to_display(
        arr,
        bits_stored=bits_stored,
        signed=signed,
        photometric=photometric,
        **_grey_params(ds, frame),
    )
    return img, voi.describe()


def read_dicom(
    path: str | Path, *, limits: ReadLimits | None = None, decode: bool = True
) -> list[ImageFrame]:
    """Read one DICOM file into frames; problems become ``error``/``skipped`` frames."""
    # pydicom warns about every odd value of a malformed header; in a batch of thousands of files
    # that is noise (and it may echo header values). The frame's status/reason is the record.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(path, limits, decode)


def _read_dicom(path: str | Path, limits: ReadLimits | None, decode: bool) -> list[ImageFrame]:
    shown = str(path)
    p = Path(path)
    limits = limits or ReadLimits()
    try:
        size = p.stat().st_size
    except OSError as exc:
        return _error(shown, f"cannot open file: {exc.strerror or exc}")
    if size == 0:
        return _error(shown, "empty file (0 bytes) — the transfer or export failed; resend it")
    if size > limits.max_file_bytes:
        return _error(shown, f"file is {size} bytes, over the {limits.max_file_bytes}-byte limit")
    try:
        ds = pydicom.dcmread(p, force=True, defer_size=None if decode else 1 << 16)
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes an error row
        msg = _message(exc, 200)
        lowered = msg.lower()
        if any(
            w in lowered for w in ("end of file", "truncat", "unexpected eof", "bytes expected")
        ):
            return _error(shown, f"truncated DICOM file (cut short mid-element): {msg[:160]}")
        return _error(shown, f"not a readable DICOM file: {msg}")
    try:
        return _from_dataset(ds, shown, p, size, limits, decode)
    except Exception as exc:  # noqa: BLE001 - malformed elements surface lazily, on access
        return _error(shown, f"corrupt DICOM header: {type(exc).__name__}: {_message(exc)}")


def _from_dataset(
    ds: Dataset, shown: str, p: Path, size: int, limits: ReadLimits, decode: bool
) -> list[ImageFrame]:
    if len(ds) == 0 or not any(k in ds for k in ("SOPClassUID", "PixelData", "Rows", "Modality")):
        return _error(shown, _empty_dataset_reason(ds, size))
    ts = _fix_transfer_syntax(ds)
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
    text = lambda keyword: header.header_text(ds, keyword)  # noqa: E731 - checked against its VR
    photometric = text("PhotometricInterpretation").upper()
    bits_alloc = _int(ds, "BitsAllocated", 0)
    bits_stored = _int(ds, "BitsStored", bits_alloc) or bits_alloc
    sop = text("SOPClassUID")
    part, part_reason = header.body_part(ds)
    info: dict[str, Any] = {
        "modality": text("Modality"),
        "photometric": photometric,
        "transfer_syntax": codecs.syntax_name(ts),
        "bits_stored": bits_stored,
        "rows": rows,
        "columns": cols,
        "n_frames": n_frames,
        "sop_class": _uid_name(sop),
        "voi": "",
        "file_size": size,
        # header facts the gate (osteoscan.gate) decides on
        "sop_class_uid": sop,
        "image_type": [v for v in text("ImageType").split("\\") if v],
        "samples_per_pixel": _int(ds, "SamplesPerPixel", 1),
        "conversion_type": text("ConversionType"),
        "presentation_intent": text("PresentationIntentType"),
    }
    for keyword, key in (
        ("ViewPosition", "view_position"),
        ("ImageLaterality", "laterality"),
        ("Laterality", "laterality"),
    ):
        if text(keyword) and key not in info:
            info[key] = text(keyword)
    uid, uid_note = _instance_uid(ds)
    stated, age, sex = header.states_body_part(ds), header.age_years(ds), header.sex(ds)

    def frames(status: Status, reason: str = "", count: int = 1) -> list[ImageFrame]:
        base = uid or content_image_id(p)
        why = "; ".join(x for x in (reason, uid_note) if x)
        return [
            ImageFrame(
                path=shown,
                frame=i,
                status=status,
                reason=why,
                kind="dicom",
                image_id=base + (f":{i}" if count > 1 else ""),
                info=dict(info),
                body_part=part,
                body_part_reason=part_reason,
                body_part_stated=stated,
                age=age,
                sex=sex,
            )
            for i in range(count)
        ]

    skip = non_image_reason(ds)
    if skip:
        return frames("skipped", skip)
    if "PixelData" not in ds:
        return frames("error", "DICOM file has no pixel data (PixelData element missing)")
    spp = _int(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0 or bits_alloc not in (1, 8, 16, 32) or spp not in (1, 3):
        why = f"Rows={rows}, Columns={cols}, BitsAllocated={bits_alloc}, SamplesPerPixel={spp}"
        return frames("error", f"corrupt image header ({why})")
    if not 1 <= bits_stored <= bits_alloc:
        bits_stored = bits_alloc  # a nonsensical BitsStored: the container is all we can trust
        info["bits_stored"] = bits_stored
    if n_frames > limits.max_frames:
        return frames("error", f"{n_frames} frames exceed the limit of {limits.max_frames}")
    n_pixels = rows * cols * n_frames * spp
    if n_pixels > limits.max_pixels:
        return frames(
            "error",
            f"image too large: {rows}×{cols}×{n_frames} frames×{spp} samples = {n_pixels} "
            f"pixels, over the limit of {limits.max_pixels} (corrupt header?)",
        )
    ok, why = codecs.decoder_status(ts)
    if not ok:
        return frames("error", why, n_frames)
    if not decode:
        return frames("ok", "", n_frames)
    if codecs.is_native(ts):
        expected = _expected_bytes(rows, cols, n_frames, spp, bits_alloc, photometric)
        have = len(ds.PixelData)
        if have < expected:
            return frames(
                "error",
                f"truncated DICOM: pixel data holds {have} of the {expected} bytes its header "
                "promises (incomplete transfer?) — resend the file",
            )
    return _decode_frames(ds, frames("ok", "", n_frames), bits_stored, ts)


def _instance_uid(ds: Dataset) -> tuple[str, str]:
    """(SOPInstanceUID when it is a valid UID, else ``""``; a note when one was there but bad).

    The raw value is never returned: a corrupt length can make it swallow the elements after it
    (patient name and ID among them), and ``image_id`` goes to every output.
    """
    try:
        elem = ds.get("SOPInstanceUID")
        raw = elem if elem is None else str(elem)
    except Exception:  # noqa: BLE001 - an undecodable element is an invalid UID
        return "", INVALID_UID
    if raw is None or not raw.strip("\x00 "):
        return "", ""
    return (raw.strip("\x00 "), "") if valid_uid(raw) else ("", INVALID_UID)


def _decode_frames(
    ds: Dataset, out: list[ImageFrame], bits_stored: int, ts: str
) -> list[ImageFrame]:
    from pydicom.pixels import pixel_array

    multi = len(out) > 1
    for i, fr in enumerate(out):
        try:
            # OpenJPEG, libjpeg & co. print their complaints to fd 2: catch them per file.
            with decoder_messages() as printed:
                arr = pixel_array(ds, index=i if multi else None)
            img, voi = _frame_image(ds, np.asarray(arr), i, bits_stored)
        except BaseException as exc:  # noqa: BLE001 - a frame that fails is an error row
            # Rust decoders (pylibjpeg-rle) raise pyo3's PanicException, a BaseException.
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            fr.status, fr.image = "error", None
            fr.reason = codecs.decode_failure_reason(ts, str(exc), printed.summary())
            continue
        if printed.summary():
            fr.status, fr.reason = "error", codecs.decoder_complaint(ts, printed.summary())
            continue
        if img.ndim != 2:
            fr.status, fr.reason = "error", f"unexpected decoded shape {img.shape}"
            continue
        if not np.isfinite(img).all():
            fr.status, fr.reason = "error", "decoded pixels are not finite (corrupt header values)"
            continue
        fr.image = img
        fr.info["voi"] = voi
    return out
