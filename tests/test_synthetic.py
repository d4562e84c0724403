"""Synthetic radiographs and the DICOM writer: deterministic, well-formed, pydicom round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from osteoscan.testing.synthetic import (
    encode_stored,
    invert_monochrome,
    synthetic_chest,
    synthetic_knee,
    write_dicom,
    write_png,
    write_structured_report,
)


def _texture_energy(img: np.ndarray) -> float:
    """Mean absolute Laplacian inside the bright (bone) region: fine dense trabeculae score high."""
    lap = np.abs(
        4 * img[1:-1, 1:-1] - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
    )
    bone = img[1:-1, 1:-1] > 0.3
    return float(lap[bone].mean())


def test_knee_shape_range_and_determinism() -> None:
    a = synthetic_knee(128, seed=3)
    b = synthetic_knee(128, seed=3)
    c = synthetic_knee(128, seed=4)
    assert a.shape == (128, 128) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.005
    assert synthetic_knee(96, seed=0, both_knees=True).shape == (96, 96)


def test_knee_density_changes_texture_and_brightness() -> None:
    dense = [synthetic_knee(192, seed=s, density=1.0) for s in range(3)]
    sparse = [synthetic_knee(192, seed=s, density=0.3) for s in range(3)]
    assert min(map(_texture_energy, dense)) > max(map(_texture_energy, sparse))
    # Bone brightness falls with density too (mineral loss); the column centre is bone.
    assert np.mean([d[:, 90:102].mean() for d in dense]) > np.mean(
        [s[:, 90:102].mean() for s in sparse]
    )


def test_knee_bone_is_brighter_than_soft_tissue_and_air() -> None:
    img = synthetic_knee(256, seed=0)
    air = img[:, :20].mean()
    shaft = img[10:60, 122:134].mean()
    assert shaft > air + 0.2


def test_chest_differs_from_knee() -> None:
    chest = synthetic_chest(128, seed=0)
    assert chest.shape == (128, 128)
    assert np.abs(chest - synthetic_knee(128, seed=0)).mean() > 0.1


def test_encode_stored_full_range() -> None:
    img = np.array([[0.0, 1.0]])
    assert encode_stored(img, bits_stored=12).tolist() == [[0, 4095]]
    assert encode_stored(img, bits_stored=16, signed=True).tolist() == [[-32768, 32767]]
    assert encode_stored(img, bits_stored=10, invert=True).tolist() == [[1023, 0]]


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEGLSLossless]
)
def test_write_dicom_lossless_roundtrip(tmp_path, ts) -> None:
    img = synthetic_knee(64, seed=1)
    path = write_dicom(tmp_path / "k.dcm", img, transfer_syntax=ts, sop_instance_uid="1.2.3.4")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.SOPInstanceUID == "1.2.3.4"
    np.testing.assert_array_equal(ds.pixel_array, encode_stored(img, bits_stored=12))


def test_write_dicom_lossy_j2k_is_close(tmp_path) -> None:
    img = synthetic_knee(64, seed=1)
    ds = pydicom.dcmread(write_dicom(tmp_path / "k.dcm", img, transfer_syntax=JPEG2000))
    err = np.abs(ds.pixel_array.astype(float) - encode_stored(img, bits_stored=12)).mean() / 4095
    assert 0 < err < 0.01


def test_write_dicom_header_options(tmp_path) -> None:
    img = synthetic_knee(32, seed=2)
    path = write_dicom(
        tmp_path / "x.dcm",
        np.stack([img, img, img]),
        photometric="MONOCHROME1",
        bits_stored=16,
        signed=True,
        rescale_slope=-2.0,
        rescale_intercept=100.0,
        window=(10, 200),
        voi_lut=(-5, np.arange(100)),
        body_part="LSPINE",
        patient_age=None,
        patient_birth_date="19500101",
        presentation_lut_shape="INVERSE",
    )
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 3 and ds.pixel_array.shape == (3, 32, 32)
    assert ds.pixel_array.dtype == np.int16
    assert float(ds.RescaleSlope) == -2.0 and float(ds.WindowWidth) == 200
    assert ds.VOILUTSequence[0].LUTDescriptor[:2] == [100, -5 & 0xFFFF] or (
        ds.VOILUTSequence[0].LUTDescriptor[1] in (-5, 65531)
    )
    assert "PatientAge" not in ds and ds.PatientBirthDate == "19500101"
    # MONOCHROME1 xor INVERSE is one inversion; the negative slope another: stored == encoded(img).
    np.testing.assert_array_equal(
        ds.pixel_array[0], encode_stored(img, bits_stored=16, signed=True)
    )


def test_write_dicom_without_preamble(tmp_path) -> None:
    path = write_dicom(tmp_path / "noext", synthetic_knee(32), preamble=False)
    head = path.read_bytes()[:132]
    assert head[128:132] != b"DICM"
    ds = pydicom.dcmread(path, force=True)
    assert ds.Rows == 32 and "PixelData" in ds


def test_structured_report_has_no_pixels(tmp_path) -> None:
    ds = pydicom.dcmread(write_structured_report(tmp_path / "sr.dcm"))
    assert "PixelData" not in ds and ds.Modality == "SR"


def test_write_png_depths(tmp_path) -> None:
    import cv2

    img = synthetic_knee(32)
    p16 = cv2.imread(str(write_png(tmp_path / "a.png", img, 16)), cv2.IMREAD_UNCHANGED)
    p8 = cv2.imread(str(write_png(tmp_path / "b.png", img, 8)), cv2.IMREAD_UNCHANGED)
    assert p16.dtype == np.uint16 and p8.dtype == np.uint8
    assert np.abs(p16 / 65535 - img).max() < 1e-4


def test_invert_monochrome_roundtrip(tmp_path) -> None:
    img = synthetic_knee(32)
    src = write_dicom(tmp_path / "m1.dcm", img, photometric="MONOCHROME1", window=(1500, 2000))
    ds1 = pydicom.dcmread(src)
    ds2 = pydicom.dcmread(invert_monochrome(src, tmp_path / "m2.dcm"))
    assert ds2.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_array_equal(ds2.pixel_array.astype(int), 4095 - ds1.pixel_array.astype(int))
    assert float(ds2.WindowCenter) == 4095 + 1 - 1500


def test_only_the_benchmark_imports_the_test_helpers_at_run_time() -> None:
    """Scanning, training and evaluating never depend on osteoscan.testing."""
    import osteoscan

    root = Path(osteoscan.__file__).parent
    users = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "testing" not in p.relative_to(root).parts and "osteoscan.testing" in p.read_text()
    )
    assert users == ["bench.py"]
