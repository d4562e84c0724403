"""Heatmaps drawn on the radiograph: the model input's geometry inverts crop and letterbox."""

from __future__ import annotations

import numpy as np

from osteoscan.geometry import InputGeometry, display_copy, overlay_on_source
from osteoscan.preprocess import PreprocessConfig, preprocess, preprocess_with_geometry
from osteoscan.testing import synthetic


def test_geometry_of_a_knee_joint_crop_inverts_to_the_box() -> None:
    image = synthetic.synthetic_knee(300, seed=2)[:, 40:260]  # not square: letterboxed
    cfg = PreprocessConfig(size=64, roi="knee_joint")
    pixels, geo = preprocess_with_geometry(image, cfg)
    assert geo is not None and np.array_equal(pixels, preprocess(image, cfg))
    top, left, bottom, right = geo.crop
    assert geo.source == image.shape and 0 <= top < bottom <= 300 and 0 <= left < right <= 220
    t, lf, h, w = geo.placed
    inside = np.zeros((64, 64), np.float32)
    inside[t : t + h, lf : lf + w] = 1.0
    mapped = geo.to_source(inside, image.shape)
    assert mapped[top:bottom, left:right].min() > 0.99  # the model's region, all of it
    outside = np.ones_like(mapped, bool)
    outside[top:bottom, left:right] = False
    assert mapped[outside].max() == 0.0
    padding = 1.0 - inside  # a heatmap only on the padding maps to nothing on the radiograph
    assert geo.to_source(padding, image.shape).max() < 0.05


def test_overlay_is_the_radiograph_size_with_the_region_outlined() -> None:
    image = synthetic.synthetic_knee(200, seed=3)
    geo = InputGeometry(source=(200, 200), crop=(50, 40, 150, 160), placed=(5, 0, 54, 64), size=64)
    display = display_copy(image)
    rgb = overlay_on_source(display, np.ones((64, 64), np.float32), geo)
    assert rgb.shape == (200, 200, 3) and rgb.dtype == np.uint8
    grey = rgb[10, 10]
    assert grey[0] == grey[1] == grey[2] == display[10, 10]  # outside the region: untouched
    assert tuple(rgb[50, 100]) == (255, 255, 255)  # the outline
    assert rgb[100, 100, 0] != rgb[100, 100, 2]  # inside: coloured


def test_display_copy_is_small_and_8_bit() -> None:
    big = np.random.default_rng(0).random((3000, 2000)).astype(np.float32)
    small = display_copy(big)
    assert small.dtype == np.uint8 and max(small.shape) == 1024 and small.shape[0] > small.shape[1]
    assert InputGeometry.from_dict(None) is None
    geo = InputGeometry((3000, 2000), (0, 0, 3000, 2000), (0, 11, 64, 42), 64)
    assert InputGeometry.from_dict(geo.to_dict()) == geo
