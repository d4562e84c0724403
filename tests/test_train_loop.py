"""Tests for osteoscan.train.loop: the staged fine-tuning loop on a synthetic texture task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from osteoscan.archs import create_model, freeze_backbone, unfreeze_top
from osteoscan.preprocess import PreprocessConfig, preprocess
from osteoscan.testing.synthetic import synthetic_knee
from osteoscan.train.loop import Stage, TrainEvent, class_weights, fit_member, predict_logits
from osteoscan.train.recipe import AugmentConfig, make_config

SIZE = 64


def _data(n_per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    cfg = PreprocessConfig(size=SIZE)
    imgs, ys = [], []
    for i in range(n_per_class):
        for label, density in ((0, 1.0), (1, 0.3)):
            imgs.append(
                preprocess(
                    synthetic_knee(SIZE, seed=seed * 1000 + 2 * i + label, density=density), cfg
                )
            )
            ys.append(label)
    x = torch.from_numpy(np.stack(imgs)[:, None])
    return x, np.array(ys)


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    xtr, ytr = _data(24, seed=1)
    xva, yva = _data(10, seed=2)
    return xtr, ytr, xva, yva


def _all(model: nn.Module) -> None:
    model.requires_grad_(True)


def _fit(task, seed: int = 0, events: list | None = None, **over):
    xtr, ytr, xva, yva = task
    over = {
        "epochs": 10,
        "stage1_epochs": 0,
        "lr": 1e-2,
        "patience": 10,
        "augment": AugmentConfig(rotation=10, shift=0.05, shear=0.05, zoom=0.05),
        **over,
    }
    cfg = make_config(None, batch_size=16, seed=seed, **over)
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 2)
    res = fit_member(
        model,
        xtr,
        ytr,
        xva,
        yva,
        cfg=cfg,
        stages=[Stage("all", cfg.epochs, cfg.lr, _all)],
        n_classes=2,
        positive_idx=[1],
        progress=events.append if events is not None else None,
    )
    return model, res


def test_loop_learns_texture_task(task) -> None:
    events: list[TrainEvent] = []
    model, res = _fit(task, events=events)
    _, _, xva, yva = task
    acc = float((predict_logits(model, xva).argmax(1) == yva).mean())
    assert res.best_val_auc >= 0.95
    assert acc >= 0.85
    assert len(res.history) == 10
    assert {"epoch", "train_loss", "val_loss", "val_auc", "lr", "stage"} <= set(res.history[0])
    assert res.val_logits.shape == (len(yva), 2)
    kinds = {e.kind for e in events}
    assert {"member_start", "epoch_start", "batch", "epoch_end", "member_end"} <= kinds
    # The returned weights are the best epoch's, and they reproduce the stored val logits.
    assert np.allclose(predict_logits(model, xva), res.val_logits, atol=1e-5)


def test_loop_is_reproducible(task) -> None:
    _, a = _fit(task, seed=5, epochs=2)
    _, b = _fit(task, seed=5, epochs=2)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_two_stage_freezes_backbone_and_keeps_bn_stats(task) -> None:
    xtr, ytr, xva, yva = task
    cfg = make_config(None, epochs=2, stage1_epochs=1, batch_size=16)
    model = create_model("tiny_cnn", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = [
        Stage("head", 1, 1e-2, lambda m: freeze_backbone(m, "tiny_cnn")),
        Stage("top", 1, 1e-3, lambda m: unfreeze_top(m, "tiny_cnn", 1)),
    ]
    seen: list[dict] = []

    def spy(e: TrainEvent) -> None:
        if e.kind == "epoch_end":
            seen.append({k: v.clone() for k, v in model.state_dict().items()})

    fit_member(
        model,
        xtr,
        ytr,
        xva,
        yva,
        cfg=cfg,
        stages=stages,
        n_classes=2,
        positive_idx=[1],
        progress=spy,
    )
    after_stage1 = seen[0]
    # Stage 1: the frozen first conv and its batch-norm statistics are untouched.
    assert torch.equal(after_stage1["features.0.0.weight"], before["features.0.0.weight"])
    assert torch.equal(
        after_stage1["features.0.1.running_mean"], before["features.0.1.running_mean"]
    )
    assert not torch.equal(after_stage1["classifier.1.weight"], before["classifier.1.weight"])
    # Stage 2: the top block trains, the bottom block still does not.
    assert not torch.equal(seen[1]["features.2.0.weight"], before["features.2.0.weight"])
    assert torch.equal(seen[1]["features.0.0.weight"], before["features.0.0.weight"])


def test_early_stopping_stops(task) -> None:
    _, res = _fit(task, epochs=30, patience=1, lr=1e-9)  # nothing improves after epoch 1
    assert len(res.history) < 30


def test_class_weights_inverse_frequency() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])


@pytest.mark.parametrize(("n", "bs"), [(17, 8), (9, 8), (16, 8), (2, 8)])
def test_batches_cover_every_image_once(n: int, bs: int) -> None:
    from osteoscan.train.steps import shuffled_batches

    chunks = shuffled_batches(n, bs, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))
    assert all(c.numel() >= 2 for c in chunks)  # a batch of one breaks batch norm
