"""Pure DICOM pixel maths: stored range, modality LUT, VOI policy, inversion after VOI."""

from __future__ import annotations

import numpy as np
import pytest

from osteoscan.readers import pixels


def test_stored_range_from_bits_not_dtype() -> None:
    assert pixels.stored_range(12, False) == (0, 4095)
    assert pixels.stored_range(12, True) == (-2048, 2047)
    assert pixels.stored_range(16, True) == (-32768, 32767)
    with pytest.raises(ValueError):
        pixels.stored_range(0, False)


def test_normalise_stored_masks_high_bits_and_sign_extends() -> None:
    # 12-bit unsigned in a uint16 container with garbage in bits 12..15 (e.g. overlay bits).
    arr = np.array([0xF000 | 100, 4095], dtype=np.uint16)
    assert pixels.normalise_stored(arr, 12, False).tolist() == [100, 4095]
    # 12-bit signed stored as raw two's complement in 12 bits: 0xFFF is -1, 0x800 is -2048.
    raw = np.array([0x0FFF, 0x0800, 0x07FF], dtype=np.uint16)
    assert pixels.normalise_stored(raw, 12, True).tolist() == [-1, -2048, 2047]
    # Already sign-extended int16 input is left as is.
    assert pixels.normalise_stored(np.array([-5], np.int16), 12, True).tolist() == [-5]


def test_modality_lut_rescale_and_negative_slope_range() -> None:
    vals = pixels.modality_lut(np.array([0, 10]), slope=-2.0, intercept=100.0)
    assert vals.tolist() == [100.0, 80.0]
    assert pixels.modality_range(12, False, -2.0, 100.0) == (100.0 - 2 * 4095, 100.0)
    table = (10, np.array([5, 6, 7]))
    assert pixels.modality_lut(np.array([0, 10, 12, 99]), lut=table).tolist() == [5, 5, 7, 7]


def test_window_linear_matches_dicom_formula() -> None:
    # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 → 0; x > c - 0.5 + (w-1)/2 → 1.
    c, w = 100.0, 21.0
    out = pixels.apply_window(np.array([89.5, 90.0, 99.5, 110.5, 111.0]), c, w)
    np.testing.assert_allclose(out, [0.0, 0.025, 0.5, 1.0, 1.0])
    exact = pixels.apply_window(np.array([90.0, 100.0, 110.0]), c, 20.0, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0.0, 0.5, 1.0])
    sig = pixels.apply_window(np.array([100.0]), c, w, "SIGMOID")
    np.testing.assert_allclose(sig, [0.5])


def test_voi_policy_order() -> None:
    lut = (0, np.arange(4), 8)
    assert (
        pixels.voi_policy(modality_low=0, modality_high=1, centers=[5], widths=[3], lut=lut).kind
        == "lut"
    )
    chosen = pixels.voi_policy(modality_low=0, modality_high=1, centers=[5, 9], widths=[3, 7])
    assert (chosen.kind, chosen.center, chosen.width) == ("window", 5.0, 3.0)
    # A zero width is illegal: fall through to the full modality range.
    assert (
        pixels.voi_policy(modality_low=0, modality_high=1, centers=[5], widths=[0]).kind == "range"
    )
    assert pixels.voi_policy(modality_low=-3, modality_high=9).describe() == "full range -3..9"


def test_voi_lut_table_clamps_and_scales() -> None:
    out = pixels.apply_lut(
        np.array([-10, 0, 1, 2, 50]), first=0, data=np.array([0, 100, 255]), bits=8
    )
    np.testing.assert_allclose(out, [0, 0, 100 / 255, 1, 1])


@pytest.mark.parametrize("photometric,shape,inverted", [
    ("MONOCHROME1", None, True),
    ("MONOCHROME1", "INVERSE", True),  # DX requires INVERSE with MONOCHROME1: one inversion only
    ("MONOCHROME2", "INVERSE", True),
    ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", None, False),
])  # fmt: skip
def test_needs_inversion(photometric: str, shape: str | None, inverted: bool) -> None:
    assert pixels.needs_inversion(photometric, shape) is inverted


def test_to_display_inverts_after_voi() -> None:
    # With a window, inversion must follow VOI: a value below the window is black in MONOCHROME2
    # and white in MONOCHROME1. Inverting before VOI would clip it to the wrong end.
    stored = np.array([[0, 1000, 4095]], dtype=np.uint16)
    kw = {"bits_stored": 12, "signed": False, "centers": [1000.0], "widths": [201.0]}
    mono2, voi = pixels.to_display(stored, photometric="MONOCHROME2", **kw)
    mono1, _ = pixels.to_display(stored, photometric="MONOCHROME1", **kw)
    assert voi.kind == "window"
    np.testing.assert_allclose(mono2, [[0.0, 0.5025, 1.0]], atol=1e-3)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2.dtype == np.float32


def test_to_display_full_range_negative_slope_and_signed() -> None:
    stored = np.array([[-2048, 0, 2047]], dtype=np.int16)
    img, voi = pixels.to_display(stored, bits_stored=12, signed=True, slope=-1.0, intercept=0.0)
    # Negative slope: the largest stored value is the smallest modality value → darkest.
    np.testing.assert_allclose(img, [[1.0, 2047 / 4095, 0.0]], atol=1e-6)
    assert voi.kind == "range" and voi.low == -2047.0 and voi.high == 2048.0


def test_luminance_weights() -> None:
    np.testing.assert_allclose(
        pixels.luminance(np.array([[255, 255, 255], [255, 0, 0]])), [255, 76.245]
    )
