"""Ensemble members: the split into folds, one model per (architecture, fold), held-out scores.

:func:`make_split` gives one stratified group-aware train/val/test split, or K folds whose
members use an *inner* validation part of the fold's training data (early stopping, temperature),
so the held-out fold's out-of-fold predictions stay clean. :func:`fit_members` trains every member
(:func:`~osteoscan.train.loop.fit_member` or :func:`~osteoscan.train.probe.fit_linear_probe`),
fits its temperature and accumulates calibrated held-out and validation probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osteoscan.archs import create_model, final_linear, freeze_backbone, get_arch, unfreeze_top
from osteoscan.errors import UsageError
from osteoscan.package import MemberSpec
from osteoscan.train.calibrate import fit_temperature, softmax
from osteoscan.train.loop import FitResult, Stage, TrainEvent, fit_member, predict_logits
from osteoscan.train.objectives import make_objective
from osteoscan.train.probe import fit_linear_probe
from osteoscan.train.recipe import TrainConfig
from osteoscan.train.splits import Split, kfold_split, train_val_test_split
from osteoscan.train.tscore import tscore_from_probs

# (training, validation, held-out) sample indices of one fold
FoldParts = tuple[list[int], list[int], list[int]]


def images_needed(cfg: TrainConfig) -> int:
    """Usable independent images every class needs for the split ``cfg`` asks for.

    A train/val/test split needs one in each part; K folds need one per held-out fold, and each
    fold's training part needs two (inner training and validation parts).
    """
    return max(3, cfg.folds) if cfg.folds >= 2 else 3


def _stages(cfg: TrainConfig, arch: str) -> list[Stage]:
    def everything(m: nn.Module) -> None:
        m.requires_grad_(True)

    if cfg.random_init or cfg.stage1_epochs <= 0:
        return [Stage("all", cfg.epochs, cfg.lr, everything)]

    def top(m: nn.Module) -> None:
        if cfg.unfreeze_blocks < 0:
            m.requires_grad_(True)
        else:
            unfreeze_top(m, arch, cfg.unfreeze_blocks)

    return [
        Stage("head", cfg.stage1_epochs, cfg.lr, lambda m: freeze_backbone(m, arch)),
        Stage("finetune", cfg.epochs - cfg.stage1_epochs, cfg.lr_stage2, top),
    ]


def _fresh_head(model: nn.Module, arch: str) -> None:
    """Small-normal init of the new class-logit layer on a pretrained backbone.

    timm's EfficientNet init draws it from U(±1/sqrt(num_classes)): with 3 classes and 1280
    features the first logits are ~±10, so stage 1 starts at a cross-entropy of ~10 and spends its
    few epochs undoing that. Near-zero logits start every class at equal probability.
    """
    _, layer = final_linear(model, arch)
    nn.init.normal_(layer.weight, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def make_split(cfg: TrainConfig, labels: list[str], groups: list[str], exclude: set[int]) -> Split:
    """The split ``cfg`` asks for; a split the data cannot fill is a :class:`UsageError`."""
    try:
        if cfg.folds >= 2:
            return kfold_split(
                labels, groups, k=cfg.folds, test_frac=0.0, seed=cfg.seed, exclude=exclude
            )
        return train_val_test_split(
            labels, groups, val_frac=cfg.val_fraction, test_frac=cfg.test_fraction,
            seed=cfg.seed, exclude=exclude,
        )  # fmt: skip
    except ValueError as exc:  # sklearn: a class has fewer images than parts
        raise UsageError(
            f"too few images per class for this split ({exc}); use fewer --folds or add data"
        ) from exc


def _inner_split(
    cfg: TrainConfig, idx: list[int], labels: list[str], groups: list[str], k: int
) -> tuple[list[int], list[int]]:
    """Group-aware (train, val) split of one fold's training indices."""
    sub_labels = [labels[i] for i in idx]
    smallest = min(sub_labels.count(c) for c in set(sub_labels))
    # StratifiedGroupKFold needs at least n_splits = round(1 / frac) images of every class.
    frac = max(cfg.val_fraction, 1.0 / max(2, smallest))
    try:
        inner = train_val_test_split(
            sub_labels, [groups[i] for i in idx], val_frac=min(frac, 0.5), test_frac=0.0,
            seed=cfg.seed + 17 + k,
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(f"fold {k}: too few images for an inner validation part ({exc})") from exc
    return [idx[i] for i in inner.train], [idx[i] for i in inner.val]


def fold_parts(
    cfg: TrainConfig, split: Split, labels: list[str], groups: list[str]
) -> list[FoldParts]:
    """(train, val, held-out) per fold: K-fold members validate on an inner part of their fold."""
    if cfg.folds < 2:
        return [(split.train, split.val, split.test)]
    return [
        (*_inner_split(cfg, tr, labels, groups, k), va) for k, (tr, va) in enumerate(split.folds)
    ]


@dataclass
class Members:
    """Trained members and their calibrated held-out (``held``) and validation (``cal``) sums."""

    n: int
    n_classes: int
    specs: list[MemberSpec] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    held_sum: np.ndarray = field(init=False)
    held_cnt: np.ndarray = field(init=False)
    cal_sum: np.ndarray = field(init=False)
    cal_cnt: np.ndarray = field(init=False)
    fold_of: np.ndarray = field(init=False)
    held_t: np.ndarray = field(init=False)  # summed predicted T-scores (T-score models)
    targets: list[dict[str, Any]] = field(default_factory=list)  # objective records per member

    def __post_init__(self) -> None:
        self.held_sum, self.cal_sum = (
            np.zeros((self.n, self.n_classes)),
            np.zeros((self.n, self.n_classes)),
        )
        self.held_cnt, self.cal_cnt = np.zeros(self.n), np.zeros(self.n)
        self.fold_of = np.full(self.n, -1)
        self.held_t = np.zeros(self.n)

    def target(self) -> dict[str, Any] | None:
        """The manifest's ``target``: None for plain classes; T-score scales per member."""
        if not self.targets:
            return None
        first = dict(self.targets[0])
        if first.get("kind") == "tscore":
            for key in ("scale", "val_mae", "val_rmse"):
                first[key] = [t.get(key) for t in self.targets]
        return first

    def held_tscores(self, ev: np.ndarray) -> np.ndarray:
        """Mean predicted T-score of held-out rows ``ev`` (T-score models)."""
        return self.held_t[ev] / self.held_cnt[ev]

    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows with held-out scores, their mean calibrated probabilities)."""
        ev = np.flatnonzero(self.held_cnt > 0)
        return ev, self.held_sum[ev] / self.held_cnt[ev, None]

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """(validation rows, their mean calibrated probabilities)."""
        cal = np.flatnonzero(self.cal_cnt > 0)
        return cal, self.cal_sum[cal] / self.cal_cnt[cal, None]


def _fit_one(cfg: TrainConfig, arch: str, model: nn.Module, X: torch.Tensor, y: np.ndarray,
             tr: list[int], va: list[int], common: dict[str, Any],
             fit: Callable[..., FitResult] | None = None) -> FitResult:  # fmt: skip
    if cfg.method == "probe":
        common = {k: v for k, v in common.items() if k != "objective"}
        return fit_linear_probe(
            model, arch, X[tr], y[tr], X[va], y[va], c=cfg.probe_c,
            n_components=cfg.probe_components, channels_last=cfg.channels_last, **common,
        )  # fmt: skip
    return (fit or fit_member)(
        model, X[tr], y[tr], X[va], y[va], cfg=cfg, stages=_stages(cfg, arch), **common
    )


def _progress(
    emit: Callable[[TrainEvent], None], what: str, member: int, n_members: int
) -> Callable[[int, int], None]:
    """``progress(done, total)`` for a long forward pass, as ``progress`` events."""

    def report(done: int, total: int) -> None:
        emit(TrainEvent("progress", message=what, member=member, n_members=n_members,
                        step=done, n_steps=total))  # fmt: skip

    return report


def _speed(history: list[dict[str, Any]]) -> dict[str, float]:
    """Median training images/s per stage over a member's epochs (``img_s_<stage>``)."""
    out: dict[str, list[float]] = {}
    for row in history:
        if row.get("train_img_s"):
            out.setdefault(f"img_s_{row.get('stage', '')}", []).append(float(row["train_img_s"]))
    return {k: float(np.median(v)) for k, v in out.items()}


@dataclass
class MemberFit:
    """One trained member as plain data (CPU tensors, arrays): what a process hands to rank 0.

    ``index`` is the member's place in :func:`member_plan`; ``state`` the weights of the
    class-logit network; ``logits_held``/``val_logits`` its raw held-out and validation logits.
    """

    index: int
    arch: str
    fold: int
    spec: MemberSpec
    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    temperature: float
    held: list[int]
    val: list[int]
    logits_held: np.ndarray
    val_logits: np.ndarray
    record: dict[str, Any] | None


def member_plan(cfg: TrainConfig, parts: list[FoldParts]) -> list[tuple[str, int]]:
    """(architecture, fold) of every member, in member order (architecture-major)."""
    return [(arch, k) for arch in cfg.archs for k in range(len(parts))]


def fit_member_at(
    cfg: TrainConfig, X: torch.Tensor, y: np.ndarray, parts: list[FoldParts], index: int,
    n_classes: int, pos_idx: list[int], device: torch.device, emit: Callable[[TrainEvent], None],
    tscores: np.ndarray | None = None, fit: Callable[..., FitResult] | None = None,
) -> tuple[MemberFit, nn.Module]:  # fmt: skip
    """Train member ``index`` of :func:`member_plan` (its seed depends on nothing else).

    ``fit`` replaces :func:`~osteoscan.train.loop.fit_member` (the distributed data-parallel
    fit of :mod:`osteoscan.train.ddp`); it takes the same arguments.
    """
    plan = member_plan(cfg, parts)
    arch, k = plan[index]
    tr, va, held = parts[k]
    spec = get_arch(arch)
    pretrained: bool | Path = False if cfg.random_init else (cfg.weights or True)
    # By the entry's place in --arch, not the name's: a repeated architecture is a member of
    # its own with its own seed (a seed ensemble), while unique names keep their seeds.
    seed = cfg.seed + 1000 * (index // len(parts)) + k
    torch.manual_seed(seed)
    targets = tscores if cfg.target == "tscore" and tscores is not None else y
    objective = make_objective(cfg.target, cfg.ordinal, n_classes, pos_idx, cfg.label_smoothing,
                               targets[tr], cfg.ordinal_head)  # fmt: skip
    model = create_model(arch, objective.n_outputs(), pretrained=pretrained)
    if pretrained is not False:
        _fresh_head(model, arch)
    objective.prepare(model, arch)
    common: dict[str, Any] = {
        "n_classes": n_classes, "positive_idx": pos_idx, "mean": spec.mean,
        "std": spec.std, "device": device, "seed": seed, "progress": emit,
        "member": index, "n_members": len(plan), "objective": objective,
    }  # fmt: skip
    res = _fit_one(cfg, arch, model, X, targets, tr, va, common, fit)
    temp = fit_temperature(res.val_logits, y[va]) if objective.calibrate_temperature else 1.0
    logits_h = predict_logits(model, X[held], mean=spec.mean, std=spec.std, device=device,
                              channels_last=cfg.channels_last, flip=cfg.test_time_flip,
                              progress=_progress(
                                  emit, "scoring held-out images", index, len(plan)))  # fmt: skip
    kfold = cfg.folds >= 2
    member_spec = MemberSpec.for_arch(
        arch, input_size=X.shape[-1], temperature=float(temp), fold=k if kfold else None,
        pretrained=str(getattr(model, "pretrained_source", "")),
        test_time_flip=cfg.test_time_flip,
        metrics={"val_auc": res.best_val_auc, "best_epoch": res.best_epoch,
                 "n_train": len(tr), "n_val": len(va), **_speed(res.history)},
    )  # fmt: skip
    model = model.to("cpu").eval()
    state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    out = MemberFit(index, arch, k, member_spec, state, res.history, float(temp), list(held),
                    list(va), logits_h, res.val_logits, objective.record())  # fmt: skip
    return out, model


def add_member(out: Members, fit: MemberFit, model: nn.Module, kfold: bool) -> None:
    """Accumulate one trained member's calibrated scores, spec, history and model into ``out``.

    Members must be added in :func:`member_plan` order (sums in one order: equal packages).
    """
    held, va, temp = fit.held, fit.val, fit.temperature
    probs_h = softmax(fit.logits_held, temp)
    out.held_sum[held] += probs_h
    out.held_cnt[held] += 1
    if fit.record is not None:
        out.targets.append(fit.record)
    if fit.record is not None and fit.record.get("kind") == "tscore":
        out.held_t[held] += tscore_from_probs(
            probs_h[:, None, :], [float(fit.record["scale"]) * temp]
        )
    out.cal_sum[va] += softmax(fit.val_logits, temp)
    out.cal_cnt[va] += 1
    if kfold:
        out.fold_of[held] = fit.fold
    out.specs.append(fit.spec)
    out.history += [{"member": f"m{len(out.models)}", **row} for row in fit.history]
    out.models.append(model)


def fit_members(
    cfg: TrainConfig, X: torch.Tensor, y: np.ndarray, parts: list[FoldParts], n_classes: int,
    pos_idx: list[int], device: torch.device, emit: Callable[[TrainEvent], None],
    tscores: np.ndarray | None = None,
) -> Members:  # fmt: skip
    """Train one member per (architecture, fold) and accumulate its calibrated scores.

    ``X`` holds the uint16 model inputs (N, 1, S, S), ``y`` class indices, ``parts`` the
    (train, val, held-out) indices of each fold (:func:`fold_parts`); ``tscores`` the T-scores
    a ``--target tscore`` member regresses on. :mod:`osteoscan.train.distributed` spreads the
    same :func:`fit_member_at` calls over processes.
    """
    out = Members(n=len(y), n_classes=n_classes)
    for index in range(len(member_plan(cfg, parts))):
        fit, model = fit_member_at(
            cfg, X, y, parts, index, n_classes, pos_idx, device, emit, tscores=tscores
        )
        add_member(out, fit, model, kfold=cfg.folds >= 2)
    return out
