"""Decoders that complain mean errors, and reasons a person can act on (issue 11, items 3 and 6).

A truncated or corrupt JPEG, PNG or JPEG 2000 is an ``error`` row naming the problem, never a
nearly blank ``ok`` image, and what libjpeg, libpng or OpenJPEG print never reaches stderr
unattributed. The real files of item 6 get reasons that say what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import JPEG2000Lossless

from osteoscan.discover import sniff
from osteoscan.gate import GateCode
from osteoscan.load import single_model_loader
from osteoscan.preprocess import PreprocessConfig
from osteoscan.readers.capture import decoder_messages
from osteoscan.testing import synthetic

KNEES = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"
LOAD = single_model_loader(PreprocessConfig(size=64), ["knee"])


def _one(path: Path, kind: str | None = None):
    if kind is None:
        kind, _ = sniff(path)
    (rec,) = LOAD(path, kind)
    return rec


def _real_knee_jpeg() -> bytes:
    files = sorted(KNEES.glob("*/*.jpg"))
    if not files:
        pytest.skip("../shared/data/knee-xray not present")
    return files[0].read_bytes()


def _quiet(capfd: pytest.CaptureFixture) -> None:
    err = capfd.readouterr().err
    assert err == "", f"decoder output reached stderr unattributed: {err!r}"


def test_capture_returns_what_c_code_printed(capfd: pytest.CaptureFixture) -> None:
    with decoder_messages() as printed:
        os.write(2, b"Premature end of JPEG file\n")
    assert printed.summary() == "Premature end of JPEG file"
    _quiet(capfd)


def test_truncated_real_jpeg_is_an_error(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    data = _real_knee_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 50])  # the case: 5 KB of 250 KB
    rec = _one(path)
    assert rec.status == "error" and rec.pixels is None
    assert rec.reason.startswith("truncated JPEG file")
    _quiet(capfd)


def test_jpeg_cut_in_the_middle_is_an_error(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The end-of-image marker is there, the data before it is not: libjpeg's warning decides."""
    data = _real_knee_jpeg()
    path = tmp_path / "hole.jpg"
    path.write_bytes(data[: len(data) // 3] + b"\xff\xd9")
    rec = _one(path)
    assert rec.status == "error"
    assert rec.reason.startswith("corrupt JPEG file: the decoder reported: Corrupt JPEG data")
    _quiet(capfd)


@pytest.mark.parametrize("ext", [".png", ".jp2"])
def test_truncated_png_and_jpeg2000_are_errors(
    tmp_path: Path, capfd: pytest.CaptureFixture, ext: str
) -> None:
    image = np.rint(synthetic.synthetic_knee(256, seed=1) * 255).astype(np.uint8)
    whole = tmp_path / f"whole{ext}"
    cv2.imwrite(str(whole), image)
    assert _one(whole).status == "ok"
    data = whole.read_bytes()
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[: len(data) // 2])
    rec = _one(path)
    assert rec.status == "error"
    assert rec.reason.startswith(f"truncated {'PNG' if ext == '.png' else 'JPEG 2000'} file")
    assert "not a DICOM" not in rec.reason
    _quiet(capfd)


def test_dicom_with_cut_jpeg2000_frame(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """OpenJPEG's complaint about a cut codestream becomes the row's reason."""
    path = synthetic.write_dicom(
        tmp_path / "k.dcm", synthetic.synthetic_knee(128), transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(path)
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(path)
    rec = _one(path)
    assert rec.status == "error" and rec.gate is GateCode.RADIOGRAPH
    assert rec.reason.startswith("cannot decode JPEG 2000")
    assert "the decoder printed:" in rec.reason
    _quiet(capfd)


# --- item 6: the real files -------------------------------------------------------------------


def test_small_rgb_dicoms_are_colour_skips(pydicom_data: Callable[[str], Path]) -> None:
    """Was: "preprocessing failed: ValueError: max() arg is an empty sequence"."""
    for name in ("SC_rgb", "SC_rgb_16bit_2frame", "SC_ybr_full_uncompressed", "SC_rgb_rle"):
        for rec in LOAD(pydicom_data(name), "dicom"):
            assert rec.status == "skipped" and rec.gate is GateCode.COLOUR, name
            assert rec.reason.startswith("colour secondary capture (Modality=OT")


def test_preambleless_dicoms_are_dicom(tmp_path: Path, pydicom_data: Callable[[str], Path]) -> None:
    """Was: "named .dcm but is not DICOM" for valid big-endian files without a preamble."""
    path = pydicom_data("ExplVR_BigEndNoMeta")
    assert sniff(path) == ("dicom", "")
    rec = _one(path)
    assert rec.status == "skipped" and "RT Ion Plan Storage" in rec.reason
    # a big-endian preamble-less radiograph is read and scored (8-bit: no byte swapping needed)
    knee = synthetic.write_dicom(tmp_path / "a.dcm", synthetic.synthetic_knee(64), bits_stored=8)
    ds = pydicom.dcmread(knee)
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "IM0001.dcm"
    pydicom.dcmwrite(raw, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    assert sniff(raw) == ("dicom", "")
    rec = _one(raw)
    assert rec.status == "ok" and rec.body_part == "knee", rec.reason


def test_truncated_jpeg2000_dicom_says_truncated(pydicom_data: Callable[[str], Path]) -> None:
    """Was: "not a DICOM file: no DICOM data elements found"."""
    rec = _one(pydicom_data("emri_small_jpeg_2k_lossless_too_short"))
    assert rec.status == "error"
    assert rec.reason.startswith("truncated or corrupt DICOM file (Enhanced MR Image Storage, JPEG")


def test_broken_files_keep_discoverys_reason(tmp_path: Path) -> None:
    """Was: "not a readable image file" for every file discovery called broken."""
    path = tmp_path / "x.dcm"
    path.write_text("<html>404 Not Found</html>")
    (rec,) = LOAD(path, "broken")
    assert rec.status == "error"
    assert rec.reason == "named .dcm but is not DICOM: starts with text (HTML/XML markup)"
