"""An exponential moving average of a model's weights, validated and kept in their place.

Averaging the weights over the last few hundred optimisation steps (Polyak averaging, as timm's
``ModelEmaV2`` does) smooths out the noise of the last mini-batches: on noisy labels such as KL
grades the averaged weights generalise better than any single step's. :class:`WeightEma` keeps the
average as plain tensors beside the model and swaps it *into* the model for validation
(:meth:`WeightEma.applied`) instead of keeping a second model, so code that holds references to
the model's modules (the frozen-feature cache of :mod:`osteoscan.train.frozen`, a DDP wrapper)
validates the average unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightEma"]


class WeightEma:
    """Moving average of every floating-point tensor of ``model.state_dict()``.

    ``decay`` is per optimisation step (0.998: the last ~500 steps weigh most). The first steps
    use a smaller decay, ``min(decay, (1 + t) / (10 + t))``, so the average is not anchored to
    the weights it started from. Batch-norm running statistics are averaged too.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.steps = decay, 0
        live = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
        self.shadow = {name: t.detach().clone() for name, t in live.items()}
        # state_dict() tensors share storage with the parameters and buffers, which the optimiser,
        # batch norm and load_state_dict all change in place: pair them once, not every step.
        self._pairs = [(self.shadow[name], t) for name, t in live.items()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimiser step)."""
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for avg, t in self._pairs:
            avg.lerp_(t, 1.0 - d)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model holds the averaged weights; its own come back after."""
        own = {name: t.detach().clone() for name, t in model.state_dict().items()
               if name in self.shadow}  # fmt: skip
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(own, strict=False)
