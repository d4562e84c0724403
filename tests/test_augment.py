"""Tests for osteoscan.train.augment: batched seeded affine augmentation on uint16 tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from osteoscan.train.augment import RandomAffine, affine_matrices
from osteoscan.train.recipe import AugmentConfig


def _batch(n: int = 4, size: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(0)
    arr = rng.integers(1000, 60000, size=(n, 1, size, size), dtype=np.uint16)
    return torch.from_numpy(arr)


def test_shape_dtype_preserved_and_seeded() -> None:
    x = _batch()
    a = RandomAffine(AugmentConfig(), seed=3)(x)
    b = RandomAffine(AugmentConfig(), seed=3)(x)
    c = RandomAffine(AugmentConfig(), seed=4)(x)
    assert a.shape == x.shape and a.dtype == torch.uint16
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_3d_and_uint8_input() -> None:
    x8 = (_batch()[:, 0].to(torch.int32) // 256).to(torch.uint8)
    out = RandomAffine(seed=0)(x8)
    assert out.shape == x8.shape and out.dtype == torch.uint8


def test_disabled_is_identity() -> None:
    x = _batch()
    assert RandomAffine(AugmentConfig(enabled=False))(x) is x


def test_zero_ranges_is_identity_up_to_rounding() -> None:
    cfg = AugmentConfig(rotation=0, shift=0, shear=0, zoom=0, hflip=0)
    x = _batch()
    out = RandomAffine(cfg, seed=1)(x)
    assert torch.equal(out, x)


def test_flip_only_mirrors() -> None:
    cfg = AugmentConfig(rotation=0, shift=0, shear=0, zoom=0, hflip=1.0)
    x = _batch()
    out = RandomAffine(cfg)(x)
    assert torch.equal(out, torch.flip(x, dims=[-1]))


def test_parameter_ranges() -> None:
    cfg = AugmentConfig(rotation=20, shift=0.2, shear=0.0, zoom=0.0, hflip=0.0)
    m = affine_matrices(cfg, 2000, torch.Generator().manual_seed(0))
    angles = torch.atan2(m[:, 1, 0], m[:, 0, 0])
    assert angles.abs().max() <= math.radians(20) + 1e-9
    assert angles.abs().max() > math.radians(18)  # the range is actually used
    assert m[:, :2, 2].abs().max() <= 0.4 + 1e-9  # 20 % of the side = 0.4 in [-1, 1] units


def test_content_moves_with_shift() -> None:
    # A bright square shifted right by ~20 %: its centre of mass moves right.
    img = torch.zeros(1, 1, 40, 40, dtype=torch.uint16)
    img[..., 15:25, 15:25] = 60000
    gen = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(rotation=0, shift=0.2, shear=0, zoom=0, hflip=0)
    aug = RandomAffine(cfg)
    aug.gen = gen
    m = affine_matrices(cfg, 1, torch.Generator().manual_seed(0))
    out = aug(img).float()[0, 0]
    xs = torch.arange(40.0)
    cx = float((out.sum(0) * xs).sum() / out.sum())
    expected = 19.5 + float(m[0, 0, 2]) * 20.0
    assert cx == pytest.approx(expected, abs=1.0)
