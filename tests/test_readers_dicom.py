"""DICOM reading with real files (pydicom, pydicom-data) and DICOMs built in code."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless

from osteoscan.frames import STATUSES, ReadLimits
from osteoscan.readers import codecs, pixels, read_frames
from osteoscan.testing.synthetic import (
    encode_stored,
    invert_monochrome,
    synthetic_knee,
    write_dicom,
    write_png,
    write_structured_report,
)

INFO_KEYS = {"modality", "photometric", "transfer_syntax", "bits_stored", "rows", "columns",
             "n_frames", "sop_class", "voi", "file_size"}  # fmt: skip
QUANT = 1.0 / 4095 + 1e-6  # one 12-bit step


def one(path: Path | str, **kw) -> object:
    frames = read_frames(path, **kw)
    assert len(frames) == 1, frames
    return frames[0]


def ok_image(path: Path | str, **kw) -> np.ndarray:
    fr = one(path, **kw)
    assert fr.status == "ok", fr.reason
    assert fr.image is not None and fr.image.dtype == np.float32 and fr.image.ndim == 2
    assert float(fr.image.min()) >= 0.0 and float(fr.image.max()) <= 1.0
    return fr.image


@pytest.fixture(scope="module")
def knee() -> np.ndarray:
    return synthetic_knee(64, seed=5)


# ---------------------------------------------------------------- real radiographs (pydicom-data)


@pytest.mark.parametrize("name", ["RG3", "RG1"])
def test_cr_jpeg2000_lossless_equals_uncompressed_and_lossy_close(pydicom_data, name) -> None:
    unc = one(pydicom_data(f"{name}_UNCR"))
    assert unc.status == "ok" and unc.info["photometric"] == "MONOCHROME1"
    assert set(unc.info) >= INFO_KEYS and unc.info["voi"].startswith("window")
    lossless = ok_image(pydicom_data(f"{name}_J2KR"))
    np.testing.assert_array_equal(lossless, unc.image)
    lossy = ok_image(pydicom_data(f"{name}_J2KI"))
    assert lossy.shape == unc.image.shape
    assert float(np.abs(lossy - unc.image).mean()) < 0.01


def test_rg3_monochrome1_bone_bright_and_inverted_copy_identical(pydicom_data, tmp_path) -> None:
    src = pydicom_data("RG3_UNCR")
    img = ok_image(src)
    # Lower-leg CR, MONOCHROME1: the tibia (centre) must be bright and the air beside the leg
    # (inside the collimated field) dark. Outside the collimation the plate is unexposed: white.
    h, w = img.shape
    band = img[h // 3 : h // 2]
    tibia = band[:, int(0.47 * w) : int(0.51 * w)].mean()
    air = band[:, int(0.30 * w) : int(0.37 * w)].mean()
    assert tibia > 0.6 and air < 0.15
    copy = invert_monochrome(src, tmp_path / "rg3_mono2.dcm")
    fr = one(copy)
    assert fr.info["photometric"] == "MONOCHROME2"
    np.testing.assert_allclose(fr.image, img, atol=1e-6)


def test_rg_header_facts(pydicom_data) -> None:
    fr = one(pydicom_data("RG3_UNCR"), decode=False)
    assert fr.status == "ok" and fr.image is None
    assert fr.sex == "F" and fr.age is not None and 20 < fr.age < 30  # birth date + study date
    assert fr.body_part == "unknown" and "EXTREMITY" in fr.body_part_reason
    assert fr.image_id == str(pydicom.dcmread(pydicom_data("RG3_UNCR")).SOPInstanceUID)
    chest = one(pydicom_data("RG1_UNCR"), decode=False)
    assert chest.body_part == "unknown" and "CHEST" in chest.body_part_reason


# ---------------------------------------------------------------- pydicom's bundled files


def test_ct_signed_rescale_matches_pydicom_modality_lut(pydicom_data) -> None:
    path = pydicom_data("CT_small")
    ds = pydicom.dcmread(path)
    expected_vals = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    lo, hi = pixels.modality_range(int(ds.BitsStored), True, float(ds.RescaleSlope),
                                   float(ds.RescaleIntercept))  # fmt: skip
    img = ok_image(path)
    np.testing.assert_allclose(img, (expected_vals - lo) / (hi - lo), atol=1e-6)


def test_multiframe_and_codecs_agree(pydicom_data) -> None:
    frames = read_frames(pydicom_data("emri_small"))
    rle = read_frames(pydicom_data("emri_small_RLE"))
    j2k = read_frames(pydicom_data("emri_small_jpeg_2k_lossless"))
    assert len(frames) == len(rle) == len(j2k) == 10
    assert [f.frame for f in frames] == list(range(10))
    uid = str(pydicom.dcmread(pydicom_data("emri_small")).SOPInstanceUID)
    assert frames[3].image_id == f"{uid}:3"
    assert not np.array_equal(frames[0].image, frames[5].image)
    for a, b, c in zip(frames, rle, j2k, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.image, c.image)


def test_jpegls_and_rle_equal_native(pydicom_data) -> None:
    native = ok_image(pydicom_data("MR_small"))
    np.testing.assert_array_equal(ok_image(pydicom_data("MR_small_jpeg_ls_lossless")), native)
    np.testing.assert_array_equal(ok_image(pydicom_data("MR_small_RLE")), native)


def test_colour_becomes_grey_and_jpeg_baseline_decodes(pydicom_data) -> None:
    rgb = ok_image(pydicom_data("SC_rgb"))
    ybr_jpeg = ok_image(pydicom_data("SC_rgb_jpeg_dcmtk"))
    ybr_native = ok_image(pydicom_data("SC_ybr_full_422_uncompressed"))
    assert rgb.shape == (100, 100)
    assert float(np.abs(ybr_jpeg - rgb).mean()) < 0.02
    assert float(np.abs(ybr_native - rgb).mean()) < 0.02


def test_jpeg_lossless_decodes(pydicom_data) -> None:
    img = ok_image(pydicom_data("JPEG-LL"))
    assert img.shape == (1024, 256)


def test_12bit_jpeg_extended_error_names_package(pydicom_data) -> None:
    fr = one(pydicom_data("JPEG-lossy"))
    assert fr.status == "error"
    assert "JPEG Extended" in fr.reason and "pylibjpeg-libjpeg" in fr.reason


def test_voi_lut_sequence_file(pydicom_data) -> None:
    fr = one(pydicom_data("vlut_04"))
    assert fr.status == "ok" and fr.info["voi"].startswith("VOI LUT")


@pytest.mark.parametrize("name", ["rtstruct", "liver", "test-SR", "waveform_ecg"])
def test_non_image_objects_are_skipped(pydicom_data, name) -> None:
    fr = one(pydicom_data(name))
    assert fr.status == "skipped" and "not a radiograph" in fr.reason


def test_missing_decoder_names_syntax_and_package(tmp_path, knee, monkeypatch) -> None:
    path = write_dicom(tmp_path / "ls.dcm", knee, transfer_syntax=JPEGLSLossless)

    class NoDecoder:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    codecs.decoder_status.cache_clear()
    try:
        fr = one(path)
    finally:
        codecs.decoder_status.cache_clear()
    assert fr.status == "error"
    assert "JPEG-LS Lossless" in fr.reason and "pip install pyjpegls" in fr.reason


# ---------------------------------------------------------------- DICOMs built in code


def test_monochrome1_and_monochrome2_same_image(tmp_path, knee) -> None:
    m2 = ok_image(write_dicom(tmp_path / "m2.dcm", knee, photometric="MONOCHROME2"))
    m1 = ok_image(write_dicom(tmp_path / "m1.dcm", knee, photometric="MONOCHROME1"))
    inv = ok_image(write_dicom(tmp_path / "inv.dcm", knee, presentation_lut_shape="INVERSE"))
    both = ok_image(write_dicom(tmp_path / "both.dcm", knee, photometric="MONOCHROME1",
                                presentation_lut_shape="INVERSE"))  # fmt: skip
    stored = pydicom.dcmread(tmp_path / "m1.dcm").pixel_array
    assert stored.mean() > 4095 / 2  # MONOCHROME1 really stores bone dark (inverted values)
    for img in (m1, inv, both):
        np.testing.assert_allclose(img, m2, atol=1e-6)
    np.testing.assert_allclose(m2, knee, atol=QUANT / 2 + 1e-6)


def test_negative_slope_and_signed_give_same_image(tmp_path, knee) -> None:
    ref = ok_image(write_dicom(tmp_path / "ref.dcm", knee))
    neg = write_dicom(tmp_path / "neg.dcm", knee, rescale_slope=-1.0, rescale_intercept=4095.0)
    assert pydicom.dcmread(neg).pixel_array.mean() > 4095 / 2  # stored inverted
    np.testing.assert_allclose(ok_image(neg), ref, atol=1e-6)
    signed = ok_image(write_dicom(tmp_path / "s.dcm", knee, signed=True, rescale_intercept=-1024.0))
    np.testing.assert_allclose(signed, ref, atol=1e-6)


def test_window_center_width_applied(tmp_path, knee) -> None:
    path = write_dicom(tmp_path / "w.dcm", knee, window=(1200.0, 800.0))
    fr = one(path)
    assert fr.info["voi"] == "window 1200/800 LINEAR"
    stored = encode_stored(knee, bits_stored=12).astype(float)
    np.testing.assert_allclose(fr.image, pixels.apply_window(stored, 1200.0, 800.0), atol=1e-6)
    assert float(fr.image.max()) == 1.0 and float(fr.image.min()) == 0.0  # the window clips


def test_voi_lut_sequence_applied(tmp_path, knee) -> None:
    lut = (np.sqrt(np.arange(4096) / 4095.0) * 255).astype(np.uint16)  # a gamma curve, 8-bit out
    fr = one(write_dicom(tmp_path / "lut.dcm", knee, voi_lut=lut, window=(100.0, 10.0)))
    assert fr.info["voi"].startswith("VOI LUT")  # the LUT wins over the window
    stored = encode_stored(knee, bits_stored=12)
    np.testing.assert_allclose(fr.image, lut[stored] / 255.0, atol=1e-6)


def test_multiframe_synthetic(tmp_path) -> None:
    imgs = np.stack([synthetic_knee(48, seed=s) for s in range(3)])
    path = write_dicom(tmp_path / "mf.dcm", imgs, sop_instance_uid="1.2.3.9")
    frames = read_frames(path)
    assert [f.image_id for f in frames] == ["1.2.3.9:0", "1.2.3.9:1", "1.2.3.9:2"]
    for fr, img in zip(frames, imgs, strict=True):
        assert fr.status == "ok" and fr.info["n_frames"] == 3
        np.testing.assert_allclose(fr.image, img, atol=QUANT)
    assert len(read_frames(path, decode=False)) == 3


@pytest.mark.parametrize("ts", [JPEG2000Lossless, RLELossless, JPEGLSLossless])
def test_lossless_syntaxes_equal_native(tmp_path, knee, ts) -> None:
    ref = ok_image(write_dicom(tmp_path / "ref.dcm", knee, bits_stored=16))
    comp = ok_image(write_dicom(tmp_path / "c.dcm", knee, bits_stored=16, transfer_syntax=ts))
    np.testing.assert_array_equal(comp, ref)


def test_lossy_j2k_within_one_percent(tmp_path, knee) -> None:
    ref = ok_image(write_dicom(tmp_path / "ref.dcm", knee))
    lossy = ok_image(write_dicom(tmp_path / "l.dcm", knee, transfer_syntax=JPEG2000))
    assert 0 < float(np.abs(lossy - ref).mean()) < 0.01


def test_no_extension_no_preamble_sniffed_by_content(tmp_path, knee) -> None:
    path = write_dicom(tmp_path / "IM000001", knee, preamble=False)
    fr = one(path)
    assert fr.status == "ok" and fr.kind == "dicom", fr.reason
    assert fr.info["transfer_syntax"] == "Implicit VR Little Endian"
    np.testing.assert_allclose(fr.image, knee, atol=QUANT)


@pytest.mark.parametrize("bits", [8, 16])
def test_dicom_and_png_of_same_pixels_give_same_image(tmp_path, knee, bits) -> None:
    dcm = ok_image(write_dicom(tmp_path / "k.dcm", knee, bits_stored=bits))
    png = ok_image(write_png(tmp_path / "k.png", knee, bits))
    np.testing.assert_array_equal(dcm, png)


def test_header_facts_and_no_phi(tmp_path, knee) -> None:
    path = write_dicom(
        tmp_path / "s.dcm",
        knee,
        body_part=None,
        study_description="XR KNEE 2 VIEWS",
        patient_age="780M",
        patient_sex="M",
        patient_name="SECRET^NAME",
        patient_id="PID-SECRET",
        patient_birth_date="19400101",
    )
    fr = one(path)
    assert (fr.body_part, fr.age, fr.sex) == ("knee", 65.0, "M")
    assert "StudyDescription" in fr.body_part_reason
    text = repr({k: v for k, v in vars(fr).items() if k != "image"})
    for secret in ("SECRET", "PID-SECRET", "19400101"):
        assert secret not in text


def test_structured_report_skipped(tmp_path) -> None:
    fr = one(write_structured_report(tmp_path / "sr.dcm"))
    assert fr.status == "skipped" and "SR" in fr.reason


# ---------------------------------------------------------------- broken files


def _truncated(tmp_path: Path, knee: np.ndarray) -> Path:
    data = write_dicom(tmp_path / "full.dcm", knee).read_bytes()
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(data[: len(data) - 3000])
    return bad


def test_broken_files_become_errors_with_reasons(tmp_path, knee) -> None:
    (tmp_path / "zero.dcm").write_bytes(b"")
    (tmp_path / "x.dcm").write_text("this is not a DICOM file\n")
    (tmp_path / "random.dcm").write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8)
    nopix = write_dicom(tmp_path / "nopix.dcm", knee)
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    cases = {
        "zero.dcm": "empty file",
        "x.dcm": "",
        "random.dcm": "",
        "nopix.dcm": "no pixel data",
    }
    for name, words in cases.items():
        for kind in (None, "dicom"):
            fr = one(tmp_path / name, kind=kind)
            assert fr.status == "error", (name, kind)
            assert fr.reason and words in fr.reason, (name, fr.reason)
    trunc = _truncated(tmp_path, knee)
    fr = one(trunc)
    assert fr.status == "error" and "truncated" in fr.reason.lower()
    assert one(trunc, decode=False).status in {"ok", "error"}  # header-only read does not decode


def test_limits_checked_before_decoding(tmp_path, knee) -> None:
    path = write_dicom(tmp_path / "k.dcm", knee)
    fr = one(path, limits=ReadLimits(max_pixels=1000))
    assert fr.status == "error" and "too large" in fr.reason
    assert "over the" in one(path, limits=ReadLimits(max_file_bytes=100)).reason
    frames = read_frames(write_dicom(tmp_path / "mf.dcm", np.stack([knee] * 3)),
                         limits=ReadLimits(max_frames=2))  # fmt: skip
    assert frames[0].status == "error" and "frames exceed" in frames[0].reason
    # An absurd header (65535 × 65535) with tiny pixel data fails fast, without allocating.
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.save_as(tmp_path / "absurd.dcm")
    t0 = time.perf_counter()
    fr = one(tmp_path / "absurd.dcm")
    assert fr.status == "error" and "too large" in fr.reason
    assert time.perf_counter() - t0 < 1.0


def test_mutated_files_never_raise(tmp_path, knee) -> None:
    data = bytearray(write_dicom(tmp_path / "src.dcm", synthetic_knee(32, seed=1)).read_bytes())
    rng = np.random.default_rng(0)
    for i in range(40):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(mutated), size=int(rng.integers(1, 20))):
            mutated[pos] = int(rng.integers(0, 256))
        if i % 4 == 0:
            mutated = mutated[: int(rng.integers(1, len(mutated)))]
        path = tmp_path / f"m{i}.dcm"
        path.write_bytes(bytes(mutated))
        t0 = time.perf_counter()
        frames = read_frames(path)
        assert time.perf_counter() - t0 < 5.0
        assert frames and all(f.status in STATUSES for f in frames)
        assert all((f.image is not None) == (f.status == "ok") for f in frames)
        assert all(f.reason for f in frames if f.status != "ok")
