"""The frozen-prefix feature cache: exact split, exact validation logits, a reproducible fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from osteoscan.archs import create_model, freeze_backbone, unfreeze_top
from osteoscan.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from osteoscan.train.augment import RandomAffine
from osteoscan.train.frozen import FrozenPrefix, split_frozen
from osteoscan.train.loop import Stage, fit_member, predict_logits
from osteoscan.train.recipe import AugmentConfig, make_config

ARCH = "efficientnet_lite0"  # random init: the split is about structure, not weights
SIZE = 32


def _model(top: int) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(ARCH, 3)
    freeze_backbone(model, ARCH)
    if top:
        unfreeze_top(model, ARCH, top)
    return model.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 65535, (n, 1, SIZE, SIZE), generator=g, dtype=torch.int32).to(
        torch.uint16
    )


@pytest.mark.parametrize(("top", "where"), [(0, "the classifier"), (2, "blocks[5:]"), (7, None)])
def test_prefix_then_rest_is_the_whole_network(top: int, where: str | None) -> None:
    model = _model(top)
    split = split_frozen(model)
    if where is None:  # everything trains: nothing to cache
        assert split is None
        return
    assert split is not None and split.where.startswith(where)
    x = to_model_input(_images(4, 1), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        assert torch.allclose(split.rest(split.prefix(x)), model(x), atol=1e-5)


def test_unsupported_networks_train_uncached() -> None:
    assert split_frozen(create_model("tiny_cnn", 2)) is None


def test_cached_validation_logits_equal_the_uncached_ones() -> None:
    model = _model(2)
    split = split_frozen(model)
    assert split is not None
    xtr, xva = _images(6, 2), _images(5, 3)
    aug = RandomAffine(AugmentConfig(), seed=1)
    norm = (IMAGENET_MEAN, IMAGENET_STD)
    cache = FrozenPrefix(
        split, xtr, xva, views=3, augment=aug, norm=norm, channels_last=True, batch_size=4
    )
    assert tuple(cache.train.shape[:2]) == (3, 6) and cache.train.dtype == torch.float16
    # View 0 is the image itself; the others are augmented copies.
    assert not torch.allclose(cache.train[0].float(), cache.train[1].float())
    direct = predict_logits(model, xva, batch_size=4)
    assert np.allclose(cache.val_logits(torch.device("cpu"), 4).numpy(), direct, atol=1e-5)


def test_cached_test_time_flip_logits_equal_the_uncached_ones() -> None:
    model = _model(2)
    split = split_frozen(model)
    assert split is not None
    xtr, xva = _images(4, 2), _images(5, 3)
    aug = RandomAffine(AugmentConfig(), seed=1)
    cache = FrozenPrefix(split, xtr, xva, views=2, augment=aug, norm=(IMAGENET_MEAN, IMAGENET_STD),
                         channels_last=True, batch_size=4, flip=True)  # fmt: skip
    plain = predict_logits(model, xva, batch_size=4)
    mirror = predict_logits(model, xva.flip(-1), batch_size=4)
    assert not np.allclose(plain, mirror, atol=1e-3)
    flipped = predict_logits(model, xva, batch_size=4, flip=True)
    assert np.allclose(flipped, (plain + mirror) / 2, atol=1e-5)
    assert np.allclose(cache.val_logits(torch.device("cpu"), 4).numpy(), flipped, atol=1e-5)


def test_fit_with_cached_features_is_reproducible_and_learns() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 8)
    # Classes differ in brightness, which survives any frozen random network.
    x = torch.from_numpy((rng.random((24, 1, SIZE, SIZE)) * 8000 + y[:, None, None, None] * 20000)
                         .astype(np.uint16))  # fmt: skip
    cfg = make_config(None, epochs=4, stage1_epochs=2, batch_size=8, lr=1e-2, lr_stage2=1e-3,
                      feature_views=2, augment=AugmentConfig(rotation=5, shift=0.05, shear=0.0,
                                                             zoom=0.05))  # fmt: skip

    def run() -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
        model = _model(0).train()
        stages = [Stage("head", 2, cfg.lr, lambda m: freeze_backbone(m, ARCH)),
                  Stage("top", 2, cfg.lr_stage2, lambda m: unfreeze_top(m, ARCH, 2))]  # fmt: skip
        events: list[str] = []
        res = fit_member(model, x, y, x[::2], y[::2], cfg=cfg, stages=stages, n_classes=3,
                         positive_idx=[2], seed=0,
                         progress=lambda e: events.append(e.message))  # fmt: skip
        assert any(m.startswith("caching frozen features (training blocks") for m in events)
        # Each stage's one-off caching pass is timed on its first epoch's row.
        assert [bool(h.get("cache_s")) for h in res.history] == [True, False, True, False]
        return (
            [h["train_loss"] for h in res.history],
            res.state_dict,
            [h["stage"] for h in res.history],
        )

    losses, state, stages = run()
    losses2, state2, _ = run()
    assert losses == losses2 and all(torch.equal(state[k], state2[k]) for k in state)
    assert stages == ["head", "head", "top", "top"]
    assert losses[1] < losses[0]  # the head learns from the cached pooled features
    # (the random-init network's top blocks then start from scratch: their loss says nothing)
