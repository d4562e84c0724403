"""Fit one ensemble member: staged fine-tuning with early stopping on validation ROC-AUC.

The data are small ``uint16`` tensors (N, 1, S, S) from :mod:`osteoscan.train.cache`; they are
moved to the device once, augmented there (:class:`~osteoscan.train.augment.RandomAffine`) and
turned into normalised 3-channel input by the same :func:`osteoscan.preprocess.to_model_input`
that scanning uses.

A fit is a list of :class:`Stage`\\ s. Each stage sets which parameters train (``setup``), gets a
fresh optimiser and learning-rate schedule, and runs until its epoch budget or until validation
AUC has not improved for ``patience`` epochs. The two-stage fine-tuning of the papers is
``[Stage("head", ..., freeze_backbone), Stage("top", ..., unfreeze_top)]``; training from scratch
is one stage over everything. The best state over all stages (by validation AUC of the
positive-vs-rest score, ties broken by validation loss) is returned.

Frozen batch-norm layers are kept in eval mode so their ImageNet running statistics are not
overwritten by a handful of small, augmented batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from osteoscan.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from osteoscan.train.augment import RandomAffine
from osteoscan.train.ema import WeightEma
from osteoscan.train.frozen import FrozenPrefix, split_frozen
from osteoscan.train.objectives import ClassObjective
from osteoscan.train.recipe import TrainConfig
from osteoscan.train.steps import (
    autocast,
    class_weights,
    freeze_bn_stats,
    lr_lambda,
    make_optimizer,
    positive_auc,
    predict_logits,
    rate,
    seed_everything,
    shuffled_batches,
)

__all__ = [
    "TrainEvent",
    "Stage",
    "FitResult",
    "fit_member",
    "predict_logits",
    "class_weights",
    "seed_everything",
    "positive_auc",
]

ProgressFn = Callable[["TrainEvent"], None]


@dataclass
class TrainEvent:
    """One progress report from the training core (rendered by the CLI, logged otherwise).

    ``kind``: ``phase`` (a step of the pipeline, ``message`` says which), ``read`` (images read,
    ``step``/``n_steps``), ``member_start``, ``epoch_start``, ``batch``, ``epoch_end`` (``metrics``
    holds train_loss, val_loss, val_auc, lr, seconds, train_img_s, val_img_s), ``member_end``,
    ``progress`` (a long forward pass: ``message`` says which, ``step``/``n_steps`` images),
    ``warning`` (a problem in the data a person should fix, ``message`` says which), ``done``.
    """

    kind: str
    message: str = ""
    member: int = 0
    n_members: int = 1
    stage: str = ""
    epoch: int = 0
    n_epochs: int = 0
    step: int = 0
    n_steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """One fine-tuning stage: ``setup(model)`` chooses the trainable parameters."""

    name: str
    epochs: int
    lr: float
    setup: Callable[[nn.Module], None]


@dataclass
class FitResult:
    """Best weights (CPU tensors), per-epoch history and validation logits of the best state."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_auc: float
    val_logits: np.ndarray


@dataclass
class _Best:
    """The best state so far (by validation AUC, ties by validation loss)."""

    key: tuple[float, float] | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    auc: float = float("nan")
    logits: np.ndarray | None = None

    def offer(self, model: nn.Module, epoch: int, auc: float, loss: float, logits: Any) -> bool:
        """Keep ``model``'s state if it beats the best so far; True when it does."""
        key = (auc if math.isfinite(auc) else -1.0, -loss if math.isfinite(loss) else -1e9)
        if self.key is not None and key <= self.key:
            return False
        self.key, self.epoch, self.auc, self.logits = key, epoch, auc, logits
        self.state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        return True


class _Fit:
    """One member's fit: tensors on the device, the loss, one epoch or one stage at a time."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, seed: int,
                 data: tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray],
                 norm: tuple[Sequence[float], Sequence[float]], n_classes: int,
                 objective: ClassObjective, event: Callable[..., None]) -> None:  # fmt: skip
        train_x, train_y, self.val_x, val_y = data
        self.model, self.cfg, self.device, self.event = model, cfg, device, event
        self.mean, self.std = norm
        self.objective = objective
        self.amp = (
            (device.type == "cuda") if cfg.amp is None else bool(cfg.amp and device.type == "cuda")
        )
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model.to(device)
        model.to(memory_format=fmt)
        self.gen = torch.Generator().manual_seed(seed)
        self.augment = RandomAffine(cfg.augment, seed=seed + 1)
        self.tx = train_x.to(device)
        self.ty = objective.target(train_y, device)
        self.val_y = np.asarray(val_y)
        wy = objective.class_weights_for(train_y)
        use = cfg.class_weights and wy is not None
        self.weight = class_weights(wy, n_classes).to(device) if use and wy is not None else None
        bf16 = torch.cuda.is_bf16_supported() if self.amp else True
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and not bf16)
        n_out = objective.n_outputs()
        self.best = _Best(logits=np.zeros((len(self.val_y), n_out), dtype=np.float32))
        self.epoch = 0
        self.cache: FrozenPrefix | None = None  # this stage's frozen-prefix features, if any
        self.ema: WeightEma | None = None  # this stage's weight average (cfg.ema_decay > 0)
        self.view_gen = torch.Generator().manual_seed(seed + 2)
        self.seed = seed

    def cache_frozen(self) -> None:
        """With ``feature_views``, compute this stage's frozen prefix once (train.frozen)."""
        self.cache = None
        split = split_frozen(self.model) if self.cfg.feature_views > 0 else None
        if split is None:
            return
        # A frozen-everything stage trains a linear head: augmented copies add little there.
        views = 1 if split.where == "the classifier" else self.cfg.feature_views

        def progress(done: int, total: int) -> None:
            self.event("progress", message=f"caching frozen features (training {split.where})",
                       epoch=self.epoch, step=done, n_steps=total)  # fmt: skip

        self.model.eval()
        self.cache = FrozenPrefix(
            split, self.tx, self.val_x, views=views, augment=self.augment,
            norm=(self.mean, self.std), channels_last=self.cfg.channels_last,
            batch_size=self.cfg.batch_size * 2, flip=self.cfg.test_time_flip, progress=progress,
        )  # fmt: skip

    def validate(self) -> tuple[np.ndarray, float, float]:
        """(validation logits, loss, positive-vs-rest AUC) of the model as it is."""

        def progress(done: int, total: int) -> None:
            self.event("progress", message="validating", epoch=self.epoch, step=done,
                       n_steps=total)  # fmt: skip

        if self.cache is not None:
            self.model.eval()
            bs = self.cfg.batch_size * 2
            logits = self.cache.val_logits(self.device, bs).numpy().astype(np.float32)
        else:
            logits = predict_logits(
            self.model, self.val_x, mean=self.mean, std=self.std, device=self.device,
                batch_size=self.cfg.batch_size * 2, channels_last=self.cfg.channels_last,
                amp=self.amp, flip=self.cfg.test_time_flip, progress=progress,
            )  # fmt: skip
        if len(self.val_y) == 0:
            return logits, float("nan"), float("nan")
        return logits, *self.objective.validate(logits, self.val_y)

    def batches(self) -> list[tuple[torch.Tensor, float]]:
        """This epoch's shuffled batches of training rows, each with its loss weight (1 here;
        a sharded fit returns its shard of each batch and the weight that keeps the mean)."""
        return [
            (idx, 1.0) for idx in shuffled_batches(self.tx.shape[0], self.cfg.batch_size, self.gen)
        ]

    def forward(self, idx: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        """Training logits of rows ``idx``: from cached frozen features, else the augmented
        images through the whole network."""
        dev = self.device
        if self.cache is not None:
            return self.cache.split.rest(self.cache.batch(idx, self.view_gen, dev))
        xb = to_model_input(self.augment(self.tx[idx.to(dev)]), self.mean, self.std,
                            self.cfg.channels_last)  # fmt: skip
        return self.model(xb)

    def epoch_loss(self, total: float, count: int) -> float:
        """The epoch's mean training loss from this process's sums."""
        return total / max(count, 1)

    def train_epoch(self, opt: torch.optim.Optimizer, sched: Any, params: list[nn.Parameter],
                    stage: str, steps: int) -> float:  # fmt: skip
        """One pass over the shuffled training data; returns the mean training loss."""
        cfg, dev = self.cfg, self.device
        total, count = 0.0, 0
        for i, (idx, weight) in enumerate(self.batches()):
            with autocast(dev, self.amp):
                logits = self.forward(idx, params)
            loss = self.objective.loss(logits, self.ty[idx.to(dev)], self.weight)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss if weight == 1.0 else loss * weight).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            sched.step()
            if self.ema is not None:
                self.ema.update(self.model)
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
            self.event("batch", stage=stage, epoch=self.epoch, step=i + 1, n_steps=steps,
                       metrics={"loss": float(loss.detach())})  # fmt: skip
        return self.epoch_loss(total, count)

    def run_stage(self, stage: Stage, history: list[dict[str, Any]]) -> None:
        """Train through ``stage`` from the best weights so far, with early stopping."""
        cfg, model = self.cfg, self.model
        if self.best.state:
            # Each stage starts from the best weights so far, not from an overfitted last epoch.
            model.load_state_dict(self.best.state)
        stage.setup(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        t_cache = time.perf_counter()
        self.cache_frozen()
        cache_s = time.perf_counter() - t_cache if self.cache is not None else 0.0
        # Each stage averages its own steps, from the weights it starts with.
        self.ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        opt = make_optimizer(params, cfg, stage.lr)
        steps = len(
            shuffled_batches(self.tx.shape[0], cfg.batch_size, torch.Generator().manual_seed(0))
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(cfg, steps * stage.epochs, steps * cfg.warmup_epochs)
        )
        plateau = None
        if cfg.schedule == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=0.5, patience=max(1, cfg.patience // 2)
            )
        stale = 0
        for _ in range(stage.epochs):
            self.epoch += 1
            t0 = time.perf_counter()
            model.train()
            freeze_bn_stats(model)
            self.event("epoch_start", stage=stage.name, epoch=self.epoch, n_steps=steps)
            train_loss = self.train_epoch(opt, sched, params, stage.name, steps)
            t_val = time.perf_counter()
            # With an average, it is the averaged weights that are validated and kept.
            with self.ema.applied(model) if self.ema is not None else contextlib.nullcontext():
                logits_v, vloss, vauc = self.validate()
                improved = self.best.offer(model, self.epoch, vauc, vloss, logits_v)
            t_end = time.perf_counter()
            if plateau is not None:
                plateau.step(vauc if math.isfinite(vauc) else -vloss)
            stale = 0 if improved else stale + 1
            row = {"epoch": self.epoch, "stage": stage.name, "train_loss": train_loss,
                   "val_loss": vloss, "val_auc": vauc, "lr": opt.param_groups[0]["lr"],
                   "seconds": t_end - t0, "best": improved,
                   "train_img_s": rate(self.tx.shape[0], t_val - t0),
                   "val_img_s": rate(len(self.val_y), t_end - t_val)}  # fmt: skip
            if cache_s:  # the stage's one-off frozen-feature pass, on its first epoch's row
                row["cache_s"], cache_s = cache_s, 0.0
            history.append(row)
            self.event("epoch_end", stage=stage.name, epoch=self.epoch, metrics=dict(row))
            if stale >= cfg.patience:
                break
        self.cache = None  # the next stage freezes less: its prefix differs
        self.ema = None


def fit_member(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: np.ndarray,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    *,
    cfg: TrainConfig,
    stages: Sequence[Stage],
    n_classes: int,
    positive_idx: Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    progress: ProgressFn | None = None,
    member: int = 0,
    n_members: int = 1,
    objective: ClassObjective | None = None,
    make_fit: Callable[..., _Fit] | None = None,
) -> FitResult:
    """Train ``model`` through ``stages``; return the best state by validation AUC.

    ``train_x``/``val_x`` are uint16 (N, 1, S, S) CPU tensors, ``train_y``/``val_y`` int class
    indices (or what ``objective`` trains on: T-scores). Deterministic for a given ``seed`` on
    the same device and thread count. The returned state and validation logits are those of
    the class-logit network :meth:`ClassObjective.finish` makes of the best state. ``make_fit``
    builds the per-epoch machinery (default :class:`_Fit`; a DDP fit shards the batches).
    """
    objective = objective or ClassObjective(n_classes, list(positive_idx), cfg.label_smoothing)
    seed = cfg.seed if seed is None else seed
    seed_everything(seed)
    emit = progress or (lambda _e: None)
    n_epochs = sum(s.epochs for s in stages)

    def event(kind: str, **kw: Any) -> None:
        emit(TrainEvent(kind, member=member, n_members=n_members, n_epochs=n_epochs, **kw))

    fit = (make_fit or _Fit)(model, cfg, torch.device(device), seed,
                             (train_x, train_y, val_x, val_y), (mean, std), n_classes, objective,
                             event)  # fmt: skip
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


def arch_of(model: nn.Module) -> str:
    """The registry name :func:`osteoscan.archs.create_model` stamped on ``model``."""
    return str(getattr(model, "osteoscan_arch", ""))
