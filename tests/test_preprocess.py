"""Tests for the shared preprocessing function."""

import numpy as np
import pytest
import torch

from osteoscan.preprocess import PreprocessConfig, preprocess, to_model_input


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    img = np.ones((200, 100), dtype=np.float32)
    img[:, :50] = 0.0
    out = preprocess(img, PreprocessConfig(size=64, normalize="none"))
    assert out.shape == (64, 64) and out.dtype == np.uint16
    # content is 64 x 32 centred: 16 black columns each side
    assert out[:, :16].max() == 0 and out[:, -16:].max() == 0
    assert out[:, 40:48].min() == 65535


def test_stretch_fills_square() -> None:
    img = np.linspace(0, 1, 200 * 100, dtype=np.float32).reshape(200, 100)
    out = preprocess(img, PreprocessConfig(size=32, resize="stretch", normalize="minmax"))
    assert out.shape == (32, 32)
    assert out.min() == 0 and out.max() == 65535


def test_flat_image_maps_to_mid_grey() -> None:
    out = preprocess(np.full((50, 50), 0.3, np.float32), PreprocessConfig(size=16))
    assert np.all(out == 32768)


def test_config_round_trip_and_unknown_key() -> None:
    cfg = PreprocessConfig(size=128, clahe=True)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"size": 10, "bogus": 1})


def test_clahe_changes_contrast_deterministically() -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((100, 100)) * 0.2 + 0.4).astype(np.float32)
    cfg = PreprocessConfig(size=64, clahe=True, normalize="none")
    a, b = preprocess(img, cfg), preprocess(img, cfg)
    assert np.array_equal(a, b)
    assert a.std() > preprocess(img, PreprocessConfig(size=64, normalize="none")).std()


def test_to_model_input_normalises_and_expands() -> None:
    batch = torch.full((2, 1, 8, 8), 65535, dtype=torch.uint16)
    x = to_model_input(batch, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x, torch.ones_like(x))
    assert x.is_contiguous(memory_format=torch.channels_last)
