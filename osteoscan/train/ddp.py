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

This subclasses the private :class:`osteoscan.train.loop._Fit` (its epoch loop is repeated in
:meth:`_ShardedFit.train_epoch` with the shard added); a change to the loop's training step
must be made in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from osteoscan.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from osteoscan.train.augment import RandomAffine
from osteoscan.train.distributed import Dist
from osteoscan.train.loop import (
    FitResult,
    ProgressFn,
    Stage,
    TrainEvent,
    _autocast,
    _batches,
    _Fit,
    arch_of,
    predict_logits,
    seed_everything,
)
from osteoscan.train.objectives import ClassObjective
from osteoscan.train.recipe import TrainConfig

__all__ = ["make_ddp_fit", "shard_batches"]


def shard_batches(
    batches: list[torch.Tensor], rank: int, world: int
) -> list[tuple[torch.Tensor, float]]:
    """This rank's shard of every batch, with the loss weight ``world * len(shard) / len(batch)``
    that makes DDP's gradient mean the gradient of the whole batch's mean loss.

    A batch with fewer images than ranks would leave a rank without images: it joins the batch
    before it (as a batch of one does in :func:`~osteoscan.train.loop._batches`).
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

    def __init__(self, *args: Any, dist: Dist, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dist = dist
        # One augmentation stream per rank: the same draws on every shard would correlate them.
        self.augment = RandomAffine(self.cfg.augment, seed=seed + 1 + 7919 * dist.rank)
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

    def train_epoch(self, opt: torch.optim.Optimizer, sched: Any, params: list[nn.Parameter],
                    stage: str, steps: int) -> float:  # fmt: skip
        """One pass over the shuffled training data, this rank's shard of every batch."""
        cfg, dev, net = self.cfg, self.device, self._wrapped(params)
        total = torch.zeros(2, dtype=torch.float64)
        batches = _batches(self.tx.shape[0], cfg.batch_size, self.gen)
        for i, (idx, weight) in enumerate(shard_batches(batches, self.dist.rank, self.dist.world)):
            xb = to_model_input(self.augment(self.tx[idx.to(dev)]), self.mean, self.std,
                                cfg.channels_last)  # fmt: skip
            with _autocast(dev, self.amp):
                logits = net(xb)
            loss = self.objective.loss(logits, self.ty[idx.to(dev)], self.weight)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss * weight).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            sched.step()
            total += torch.tensor([float(loss.detach()) * idx.numel(), idx.numel()])
            self.event("batch", stage=stage, epoch=self.epoch, step=i + 1, n_steps=steps,
                       metrics={"loss": float(loss.detach())})  # fmt: skip
        td.all_reduce(total, group=self.dist.objects)  # the epoch's loss over all ranks
        return float(total[0] / max(float(total[1]), 1.0))

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
            amp=self.amp,
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

    def fit_member_ddp(
        model: nn.Module, train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor,
        val_y: np.ndarray, *, cfg: TrainConfig, stages: Sequence[Stage], n_classes: int,
        positive_idx: Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD, device: torch.device | str = "cpu",
        seed: int | None = None, progress: ProgressFn | None = None, member: int = 0,
        n_members: int = 1, objective: ClassObjective | None = None,
    ) -> FitResult:  # fmt: skip
        objective = objective or ClassObjective(n_classes, list(positive_idx), cfg.label_smoothing)
        seed = cfg.seed if seed is None else seed
        seed_everything(seed)
        emit = progress or (lambda _e: None)
        n_epochs = sum(s.epochs for s in stages)

        def event(kind: str, **kw: Any) -> None:
            emit(TrainEvent(kind, member=member, n_members=n_members, n_epochs=n_epochs, **kw))

        fit = _ShardedFit(model, cfg, torch.device(device), seed,
                          (train_x, train_y, val_x, val_y), (mean, std), n_classes, objective,
                          event, dist=dist, seed=seed)  # fmt: skip
        history: list[dict[str, Any]] = []
        event("member_start")
        for stage in stages:
            if stage.epochs > 0:
                fit.run_stage(stage, history)
        best = fit.best
        if not best.state:
            best.state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        model.load_state_dict(best.state)
        model.eval()
        emit(TrainEvent("member_end", member=member, n_members=n_members,
                        metrics={"best_epoch": best.epoch, "best_val_auc": best.auc}))  # fmt: skip
        assert best.logits is not None
        val_logits = objective.finish(model, arch_of(model), best.logits, fit.val_y)
        state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        return FitResult(state, history, best.epoch, best.auc, val_logits)

    return fit_member_ddp
