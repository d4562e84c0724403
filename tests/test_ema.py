"""Tests for osteoscan.train.ema and the weight average in the training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import osteoscan.train.loop as loop
from osteoscan.archs import create_model
from osteoscan.train.ema import WeightEma
from tests.test_train_loop import _fit, task  # noqa: F401  (the module-scoped fixture)


def test_average_follows_the_recursion_and_swaps_in_and_out() -> None:
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(0.0)
        lin.bias.fill_(0.0)
    ema = WeightEma(lin, decay=0.5)
    expected = 0.0
    for step, value in enumerate([4.0, 8.0, -2.0], start=1):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
        d = min(0.5, (1 + step) / (10 + step))  # warm-up: smaller decay on the first steps
        expected = d * expected + (1 - d) * value
    assert float(ema.shadow["weight"][0, 0]) == pytest.approx(expected)
    with ema.applied(lin):
        assert torch.allclose(lin.weight, torch.full_like(lin.weight, expected))
    assert torch.equal(lin.weight, torch.full_like(lin.weight, -2.0))  # own weights back
    with pytest.raises(ValueError):
        WeightEma(lin, decay=1.0)


def test_batch_norm_statistics_are_averaged_and_counters_left_alone() -> None:
    model = create_model("tiny_cnn", 2)
    ema = WeightEma(model, decay=0.9)
    assert any(k.endswith("running_mean") for k in ema.shadow)
    assert not any(k.endswith("num_batches_tracked") for k in ema.shadow)


def test_loop_keeps_the_averaged_weights(task, monkeypatch) -> None:  # noqa: F811
    seen: list[dict[str, torch.Tensor]] = []

    class Recording(WeightEma):
        def applied(self, model):  # type: ignore[no-untyped-def]
            seen.append({k: v.clone() for k, v in self.shadow.items()})
            return super().applied(model)

    monkeypatch.setattr(loop, "WeightEma", Recording)
    _, res = _fit(task, epochs=4, ema_decay=0.9)
    assert len(seen) == 4  # one validation of the average per epoch
    best = seen[res.best_epoch - 1]
    for name, avg in best.items():
        assert torch.equal(res.state_dict[name], avg), name
    # ... and they are not the last step's weights of that epoch.
    _, plain = _fit(task, epochs=4)
    assert any(not torch.equal(res.state_dict[n], plain.state_dict[n]) for n in best)
    assert res.best_val_auc >= 0.9
