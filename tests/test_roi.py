"""Tests for the training-free knee-joint detector and its preprocessing option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from osteoscan.preprocess import PreprocessConfig, preprocess
from osteoscan.roi import crop_knee_joint, detect_knee_joint, knee_pair
from osteoscan.testing.synthetic import synthetic_chest, synthetic_knee

KNEE_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"


def _contains(box: tuple[int, int, int, int], y: float, x: float) -> bool:
    top, left, bottom, right = box
    return top <= y < bottom and left <= x < right


@pytest.mark.parametrize("size", [128, 256, 512])
@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bilateral_phantom_box_contains_both_joint_gaps(
    size: int, density: float, seed: int
) -> None:
    img = synthetic_knee(size, seed, density, both_knees=True)
    roi = detect_knee_joint(img)
    assert roi.method == "detected", roi.reason
    # The phantom's joint space is at half height, the knees at 27 % and 73 % of the width.
    for cx in (0.27, 0.73):
        assert _contains(roi.box, 0.5 * size, cx * size)
    assert len(roi.knees) == 2
    for knee, cx in zip(roi.knees, (0.27, 0.73), strict=True):
        assert _contains(knee, 0.5 * size, cx * size)
    assert all(abs(y - 0.5 * size) <= 0.03 * size for y in roi.joint_rows)
    # A real crop, not the whole film: the joints take well under half of the image.
    top, left, bottom, right = roi.box
    assert (bottom - top) * (right - left) < 0.35 * size * size


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_single_knee_phantom_box_is_square_on_the_joint(seed: int) -> None:
    size = 256
    roi = detect_knee_joint(synthetic_knee(size, seed, 0.6))
    assert roi.method == "detected", roi.reason
    assert _contains(roi.box, 0.5 * size, 0.5 * size)
    top, left, bottom, right = roi.box
    assert bottom - top == right - left
    assert 0.08 * size < bottom - top < 0.5 * size


def test_non_square_and_offset_joint() -> None:
    # Whole-leg film: the knee phantom padded with air above, so the joint is at 70 % height.
    knee = synthetic_knee(256, 4, 0.8, both_knees=True)
    img = np.vstack([np.full((300, 256), knee[:20].min(), np.float32), knee])
    roi = detect_knee_joint(img)
    assert roi.method == "detected", roi.reason
    assert _contains(roi.box, 300 + 128, 0.27 * 256)
    assert _contains(roi.box, 300 + 128, 0.73 * 256)


def test_deterministic() -> None:
    img = synthetic_knee(256, 7, 0.5, both_knees=True)
    assert detect_knee_joint(img) == detect_knee_joint(img.copy())


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((64, 64), np.float32),
        np.full((100, 80), 0.7, np.float32),
        np.zeros((8, 8), np.float32),
        np.full((40, 40), np.nan, np.float32),
        np.zeros((5, 200), np.float32),
    ],
    ids=["black", "flat", "tiny", "nan", "sliver"],
)
def test_degenerate_images_fall_back_to_centre_crop(img: np.ndarray) -> None:
    roi = detect_knee_joint(img)
    assert roi.method == "fallback" and roi.reason
    top, left, bottom, right = roi.box
    h, w = img.shape
    assert 0 <= top < bottom <= h and 0 <= left < right <= w


def test_never_raises_on_noise_or_chest() -> None:
    rng = np.random.default_rng(0)
    for img in (rng.random((120, 90), dtype=np.float32), synthetic_chest(128, 0)):
        roi = detect_knee_joint(img)
        top, left, bottom, right = roi.box
        assert 0 <= top < bottom <= img.shape[0] and 0 <= left < right <= img.shape[1]


def test_preprocess_roi_option() -> None:
    img = synthetic_knee(256, 0, 0.6, both_knees=True)
    cfg = PreprocessConfig(size=64, roi="knee_joint")
    out = preprocess(img, cfg)
    assert out.shape == (64, 64) and out.dtype == np.uint16
    assert np.array_equal(out, preprocess(img, cfg))  # pure
    assert not np.array_equal(out, preprocess(img, PreprocessConfig(size=64)))
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig().roi == "none"
    assert PreprocessConfig.from_dict({"size": 64}).roi == "none"  # old manifests still load
    with pytest.raises(ValueError, match="roi"):
        preprocess(img, PreprocessConfig(size=64, roi="elbow"))  # type: ignore[arg-type]


@pytest.mark.skipif(not KNEE_DATA.is_dir(), reason="knee-xray data not present")
def test_real_knees_detected_and_joint_centred() -> None:
    """On real films every image gets a detected box well inside the image, not the whole film."""
    from osteoscan.readers import read_frames

    paths = sorted(KNEE_DATA.glob("*/*.jpg"))[::10]
    for path in paths:
        img = read_frames(path)[0].image
        assert img is not None
        roi = detect_knee_joint(img)
        assert roi.method == "detected", (path.name, roi.reason)
        top, left, bottom, right = roi.box
        h, w = img.shape
        assert (bottom - top) * (right - left) < 0.8 * h * w, path.name
        # the joint line is never in the outer 5 % of the film
        assert all(0.05 * h <= y <= 0.95 * h for y in roi.joint_rows), path.name


def test_knee_pair_gives_each_joint_its_own_square() -> None:
    img = synthetic_knee(256, seed=3, both_knees=True)
    roi = detect_knee_joint(img)
    assert len(roi.knees) == 2
    pair = knee_pair(img)
    side = max(max(b - t, r - lf) for t, lf, b, r in roi.knees)
    assert pair.shape == (side, 2 * side)
    # The left square is the left knee's crop (resized to the common side), not a blend.
    t, lf, b, r = sorted(roi.knees, key=lambda k: k[1])[0]
    left = img[t:b, lf:r]
    assert abs(float(pair[:, :side].mean()) - float(left.mean())) < 0.02
    out = preprocess(img, PreprocessConfig(size=64, roi="knee_pair"))
    assert out.shape == (64, 64) and out[:8].max() == 0  # letterboxed: a 2:1 strip, padded


def test_knee_pair_on_one_knee_is_the_joint_crop() -> None:
    img = synthetic_knee(256, seed=4, both_knees=False)
    np.testing.assert_array_equal(knee_pair(img), crop_knee_joint(img))
