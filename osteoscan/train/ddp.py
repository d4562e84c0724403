"""One member trained by every rank with DistributedDataParallel (``torchrun``, one member).

Every rank holds the whole training set and draws the same shuffled batches (same generator
seed); each takes a disjoint shard of every batch (``tensor_split`` by rank), and DDP averages
the gradients. The number of optimiser steps, the learning-rate schedule and the effective batch
size are those of one process, so the fit follows the single-process recipe; what differs is
float order, batch-norm statistics (computed per shard, rank 0's running statistics kept) and
the augmentation draws (one random stream per rank). The frozen-prefix feature cache
(``feature_views``) is not used: each epoch runs the whole network.

Validation is sharded too: each rank scores a contiguous slice of the validation images with
rank 0's batch-norm buffers, and the logits are gathered on every rank, so early stopping and
the best state are decided identically everywhere.

This subclasses the private :class:`osteoscan.train.loop._Fit`, overriding only where the
batches come from (this rank's shard), the forward (through the DDP wrapper), the epoch loss
(summed over ranks) and validation; the training step itself is the loop's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from osteoscan.preprocess import to_model_input
from osteoscan.train.augment import RandomAffine
from osteoscan.train.distributed import Dist
from osteoscan.train.loop import FitResult, _Fit, fit_member
from osteoscan.train.steps import predict_logits, shuffled_batches

__all__ = ["make_ddp_fit", "shard_batches"]


def shard_batches(
    batches: list[torch.Tensor], rank: int, world: int
) -> list[tuple[torch.Tensor, float]]:
    """This rank's shard of every batch, with the loss weight ``world * len(shard) / len(batch)``
    that makes DDP's gradient mean the gradient of the whole batch's mean loss.

    A batch with fewer images than ranks would leave a rank without images: it joins the batch
    before it (as a batch of one does in :func:`~osteoscan.train.steps.shuffled_batches`).
    """
    out = list(batches)
    while len(out) > 1 and out[-1].numel() < world:
        last = out.pop()
        out[-1] = torch.cat([out[-1], last])
    shards = []
    for idx in out:
        part = idx.tensor_split(world)[rank]
        shards.append((part, world * part.numel() / max(1, idx.numel())))
    return shards


class _ShardedFit(_Fit):
    """:class:`_Fit` with each batch sharded over the ranks and gradients averaged by DDP."""

    def __init__(self, *args: Any, dist: Dist, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dist = dist
        # One augmentation stream per rank: the same draws on every shard would correlate them.
        self.augment = RandomAffine(self.cfg.augment, seed=self.seed + 1 + 7919 * dist.rank)
        self._ddp: DistributedDataParallel | None = None
        self._ddp_params: list[nn.Parameter] | None = None

    def cache_frozen(self) -> None:
        """No frozen-prefix feature cache (``feature_views``) under DDP: every epoch runs the
        whole network on each rank's shard."""
        self.cache = None

    def _wrapped(self, params: list[nn.Parameter]) -> DistributedDataParallel:
        # DDP hooks the parameters that train at construction: a new stage needs a new wrapper.
        if self._ddp is None or self._ddp_params is not params:
            dev = self.device
            self._ddp = DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
            self._ddp_params = params
        return self._ddp

    def batches(self) -> list[tuple[torch.Tensor, float]]:
        """This rank's shard of every shuffled batch, with its loss weight."""
        batches = shuffled_batches(self.tx.shape[0], self.cfg.batch_size, self.gen)
        return shard_batches(batches, self.dist.rank, self.dist.world)

    def forward(self, idx: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        """Training logits of this rank's rows through the DDP wrapper (gradients averaged)."""
        xb = to_model_input(self.augment(self.tx[idx.to(self.device)]), self.mean, self.std,
                            self.cfg.channels_last)  # fmt: skip
        return self._wrapped(params)(xb)

    def epoch_loss(self, total: float, count: int) -> float:
        """The epoch's mean loss over all ranks."""
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        td.all_reduce(sums, group=self.dist.objects)
        return float(sums[0] / max(float(sums[1]), 1.0))

    def validate(self) -> tuple[np.ndarray, float, float]:
        """Validation logits gathered from every rank's slice, with rank 0's BN statistics."""
        for buf in self.model.buffers():
            # Each rank's last training batches moved its running statistics differently.
            td.broadcast(buf.data, src=0)
        n, world = self.val_x.shape[0], self.dist.world
        lo, hi = n * self.dist.rank // world, n * (self.dist.rank + 1) // world
        part = predict_logits(
            self.model, self.val_x[lo:hi], mean=self.mean, std=self.std, device=self.device,
            batch_size=self.cfg.batch_size * 2, channels_last=self.cfg.channels_last,
            amp=self.amp, flip=self.cfg.test_time_flip,
        )  # fmt: skip
        parts: list[Any] = [None] * world
        td.all_gather_object(parts, part, group=self.dist.objects)
        n_out = self.objective.n_outputs()
        logits = np.concatenate([p.reshape(-1, n_out) for p in parts]).astype(np.float32)
        if len(self.val_y) == 0:
            return logits, float("nan"), float("nan")
        return logits, *self.objective.validate(logits, self.val_y)


def make_ddp_fit(dist: Dist) -> Callable[..., FitResult]:
    """A drop-in for :func:`osteoscan.train.loop.fit_member` that trains with DDP on ``dist``."""
    return functools.partial(fit_member, make_fit=functools.partial(_ShardedFit, dist=dist))
