"""``osteoscan train`` as a library call: labelled images in, a calibrated model package out.

Pipeline (:func:`train`):

1. :func:`~osteoscan.train.data.load_labelled` → every file read and preprocessed once
   (:class:`~osteoscan.train.cache.ImageCache`, the same reader and preprocessing as ``scan``).
2. :func:`~osteoscan.train.dedup.find_duplicates`: conflicting duplicate groups dropped; every
   group (duplicates, explicit patient groups) stays on one side of every split.
3. Covariates: DICOM header age/sex, overridden by ``--covariates CSV``.
4. Split: one stratified group-aware train/val/test split, or K folds (``--folds K``). Each fold's
   model is an ensemble member; its early stopping and temperature use an *inner* validation part
   of the fold's training data, so the held-out fold's (out-of-fold, OOF) predictions stay clean.
5. Members: :func:`~osteoscan.train.loop.fit_member` (two-stage fine-tuning), temperature
   (:func:`~osteoscan.train.calibrate.fit_temperature`) per member.
6. Fusion + operating point + evaluation (:func:`_evaluate`): the covariate stacker
   (:func:`osteoscan.fusion.fit_fusion`) is fitted on validation (split) or OOF (K-fold)
   predictions. With K folds the reported combined / covariates-only numbers are *cross-fitted*
   (stacker fitted on the other folds' OOF rows), so no reported number comes from a model that
   saw the rows it is scored on. The screening threshold reaches ``target_sensitivity`` on those
   held-out scores. Image-only, covariates-only and combined metrics with bootstrap intervals
   (:func:`osteoscan.metrics.classification_metrics`) go into the manifest and the card.
7. :func:`osteoscan.package.save_package` with card and report PNGs.

The core reports progress through a callback of :class:`~osteoscan.train.loop.TrainEvent`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osteoscan import __version__
from osteoscan.archs import create_model, final_linear, freeze_backbone, get_arch, unfreeze_top
from osteoscan.covariates import Covariates, CovariateTable
from osteoscan.errors import OutputError, UsageError
from osteoscan.fusion import apply_covariates_only, apply_fusion, fit_fusion
from osteoscan.metrics import classification_metrics
from osteoscan.package import Manifest, MemberSpec, save_package
from osteoscan.preprocess import PreprocessConfig
from osteoscan.report import detect_source, render_report, write_card
from osteoscan.runtime import select_device
from osteoscan.train.cache import ImageCache
from osteoscan.train.calibrate import (
    fit_temperature,
    positive_score,
    screening_threshold,
    softmax,
)
from osteoscan.train.data import load_labelled
from osteoscan.train.dedup import find_duplicates
from osteoscan.train.loop import Stage, TrainEvent, fit_member, predict_logits
from osteoscan.train.probe import fit_linear_probe
from osteoscan.train.recipe import TrainConfig
from osteoscan.train.splits import Split, kfold_split, train_val_test_split

__all__ = ["train", "train_models", "TrainResult"]

ProgressFn = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """What :func:`train_models` produced (the package is written by :func:`train`)."""

    manifest: Manifest
    models: list[nn.Module]
    card: str
    report: dict[str, bytes]
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_probs: dict[str, np.ndarray] = field(default_factory=dict)


def _stages(cfg: TrainConfig, arch: str) -> list[Stage]:
    if cfg.random_init or cfg.stage1_epochs <= 0:
        return [Stage("all", cfg.epochs, cfg.lr, lambda m: m.requires_grad_(True))]

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


def _split(cfg: TrainConfig, labels: list[str], groups: list[str], exclude: set[int]) -> Split:
    try:
        if cfg.folds >= 2:
            return kfold_split(
                labels, groups, k=cfg.folds, test_frac=0.0, seed=cfg.seed, exclude=exclude
            )
        return train_val_test_split(
            labels,
            groups,
            val_frac=cfg.val_fraction,
            test_frac=cfg.test_fraction,
            seed=cfg.seed,
            exclude=exclude,
        )
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
            sub_labels,
            [groups[i] for i in idx],
            val_frac=min(frac, 0.5),
            test_frac=0.0,
            seed=cfg.seed + 17 + k,
        )
    except ValueError as exc:
        raise UsageError(f"fold {k}: too few images for an inner validation part ({exc})") from exc
    return [idx[i] for i in inner.train], [idx[i] for i in inner.val]


def _metrics(y, probs, classes, positive, threshold, cfg: TrainConfig) -> dict[str, Any]:
    return classification_metrics(
        y, probs, classes, list(positive), threshold, n_boot=cfg.n_boot, seed=cfg.seed
    )


def _evaluate(
    cfg: TrainConfig,
    classes: list[str],
    y: np.ndarray,
    covs: list[Covariates],
    cal: np.ndarray,
    cal_probs: np.ndarray,
    ev: np.ndarray,
    ev_probs: np.ndarray,
    fold_of: np.ndarray | None,
) -> tuple[dict[str, Any] | None, float, dict[str, Any], dict[str, np.ndarray]]:
    """Fit fusion, choose the threshold and compute held-out metrics.

    ``cal``/``cal_probs``: rows (and calibrated image probabilities) to fit on; ``ev``/``ev_probs``:
    rows to report on. K-fold mode passes the OOF rows as both, with ``fold_of`` to cross-fit.
    Returns (fusion, threshold, metrics, {variant: eval probabilities}).
    """
    pos_idx = [classes.index(c) for c in cfg.positive]
    ages = np.array([np.nan if c.age is None else c.age for c in covs], dtype=np.float64)
    sexes = [c.sex for c in covs]
    has_cov = np.array([not c.is_empty() for c in covs])
    ts = cfg.target_sensitivity
    is_pos = np.isin(y, pos_idx)

    def thr(rows: np.ndarray, probs: np.ndarray) -> float:
        return screening_threshold(positive_score(probs, pos_idx), is_pos[rows], ts)

    def fit(rows: np.ndarray, probs: np.ndarray) -> dict[str, Any] | None:
        if not cfg.use_covariates or not has_cov[rows].any():
            return None
        try:
            fus = fit_fusion(probs, ages[rows], [sexes[i] for i in rows], y[rows], classes)
        except ValueError:
            return None
        return fus if fus.get("models") else None

    fusion = fit(cal, cal_probs)
    out: dict[str, np.ndarray] = {"image_only": ev_probs}
    img_thr = thr(cal, cal_probs)
    metrics: dict[str, Any] = {}
    metrics["image_only"] = _metrics(y[ev], ev_probs, classes, cfg.positive, img_thr, cfg)
    threshold = img_thr
    if fusion is not None:
        ev_ages, ev_sexes = ages[ev], [sexes[i] for i in ev]
        if fold_of is None:
            comb_cal = apply_fusion(fusion, cal_probs, ages[cal], [sexes[i] for i in cal])[0]
            cov_cal = apply_covariates_only(fusion, ages[cal], [sexes[i] for i in cal])[0]
            comb_ev = apply_fusion(fusion, ev_probs, ev_ages, ev_sexes)[0]
            cov_ev = apply_covariates_only(fusion, ev_ages, ev_sexes)[0]
        else:
            # Cross-fitting: each fold's rows are fused by a stacker fitted on the other folds.
            comb_ev, cov_ev = ev_probs.copy(), np.full_like(ev_probs, np.nan)
            for k in np.unique(fold_of[ev]):
                inside = fold_of[ev] == k
                sub = fit(ev[~inside], ev_probs[~inside])
                if sub is None:
                    continue
                rows = ev[inside]
                sx = [sexes[i] for i in rows]
                comb_ev[inside] = apply_fusion(sub, ev_probs[inside], ages[rows], sx)[0]
                cov_ev[inside] = apply_covariates_only(sub, ages[rows], sx)[0]
            comb_cal, cov_cal = comb_ev, cov_ev
        threshold = thr(cal, comb_cal)
        # Rows scanned without covariates are scored image-only: they need their own threshold.
        fusion["thresholds"] = {"image_only": float(img_thr), "combined": float(threshold)}
        metrics["combined"] = _metrics(y[ev], comb_ev, classes, cfg.positive, threshold, cfg)
        out["combined"] = comb_ev
        ok_cal, ok_ev = ~np.isnan(cov_cal).any(1), ~np.isnan(cov_ev).any(1)
        if ok_ev.sum() >= 2 and ok_cal.any():
            cthr = thr(cal[ok_cal], cov_cal[ok_cal])
            metrics["covariates_only"] = _metrics(
                y[ev][ok_ev], cov_ev[ok_ev], classes, cfg.positive, cthr, cfg
            )
            out["covariates_only"] = cov_ev
    metrics["coverage"] = {"rows": int(len(ev)), "with_covariates": int(has_cov[ev].sum())}
    return fusion, float(threshold), metrics, out


def train_models(cfg: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Run the whole pipeline in memory; see the module docstring. :func:`train` saves it."""
    cfg.validate()
    emit = progress or (lambda _e: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device)
    if cfg.data is None:
        raise UsageError("--data is required")
    data = Path(cfg.data)
    for arch in cfg.archs:
        get_arch(arch)  # unknown names fail before any image is read
    emit(TrainEvent("phase", message=f"loading labelled data from {data}"))
    samples, classes = load_labelled(data)
    if len(classes) < 2:
        raise UsageError(f"need at least two classes, found {classes}")
    bad = [c for c in cfg.positive if c not in classes]
    if bad:
        raise UsageError(f"--positive {','.join(bad)} not among the classes {classes}")
    size = cfg.size or get_arch(cfg.archs[0]).default_size
    pcfg = PreprocessConfig.from_dict({**cfg.preprocess, "size": size})
    root = data if data.is_dir() else data.parent

    emit(TrainEvent("phase", message=f"reading and preprocessing {len(samples)} images"))
    cache = ImageCache(pcfg, cfg.cache_dir)
    items = cache.load_all(
        [s.path for s in samples],
        workers=cfg.read_workers,
        progress=lambda i, n: emit(TrainEvent("read", step=i, n_steps=n)),
    )
    timings["read_s"] = time.perf_counter() - t_start
    unreadable = [i for i, it in enumerate(items) if it.image is None]

    emit(TrainEvent("phase", message="finding duplicates"))
    dedup = find_duplicates(
        samples, {str(s.path): it.fingerprint for s, it in zip(samples, items, strict=True)}
    )
    exclude = set(dedup.dropped) | set(unreadable)
    labels = [s.label for s in samples]
    groups = dedup.group_of
    table = None
    if cfg.covariates_csv is not None:
        table = CovariateTable.from_csv(cfg.covariates_csv, *cfg.covariate_columns)
    covs = []
    for s, it in zip(samples, items, strict=True):
        cov = Covariates(age=it.age, sex=it.sex)
        covs.append(cov.override(table.lookup(s.path, root)) if table is not None else cov)

    split = _split(cfg, labels, groups, exclude)
    split.check_disjoint(groups)
    y = np.array([classes.index(lab) for lab in labels], dtype=np.int64)
    blank = np.zeros((size, size), dtype=np.uint16)
    X = torch.from_numpy(np.stack([it.image if it.image is not None else blank for it in items]))
    X = X[:, None]
    pos_idx = [classes.index(c) for c in cfg.positive]
    kfold = cfg.folds >= 2
    fold_parts = (
        [(*_inner_split(cfg, tr, labels, groups, k), va) for k, (tr, va) in enumerate(split.folds)]
        if kfold
        else [(split.train, split.val, split.test)]
    )
    n_members = len(cfg.archs) * len(fold_parts)
    pretrained: bool | Path = False if cfg.random_init else (cfg.weights or True)

    members: list[MemberSpec] = []
    models: list[nn.Module] = []
    history: list[dict[str, Any]] = []
    n = len(samples)
    held_sum = np.zeros((n, len(classes)))
    held_cnt = np.zeros(n)
    cal_sum = np.zeros((n, len(classes)))
    cal_cnt = np.zeros(n)
    fold_of = np.full(n, -1)
    m_i = 0
    t_fit = time.perf_counter()
    for a, arch in enumerate(cfg.archs):
        spec = get_arch(arch)
        for k, (tr, va, held) in enumerate(fold_parts):
            seed = cfg.seed + 1000 * a + k
            torch.manual_seed(seed)
            model = create_model(arch, len(classes), pretrained=pretrained)
            if pretrained is not False:
                _fresh_head(model, arch)
            common: dict[str, Any] = {
                "n_classes": len(classes),
                "positive_idx": pos_idx,
                "mean": spec.mean,
                "std": spec.std,
                "device": device,
                "seed": seed,
                "progress": emit,
                "member": m_i,
                "n_members": n_members,
            }
            if cfg.method == "probe":
                res = fit_linear_probe(
                    model,
                    arch,
                    X[tr],
                    y[tr],
                    X[va],
                    y[va],
                    c=cfg.probe_c,
                    n_components=cfg.probe_components,
                    channels_last=cfg.channels_last,
                    **common,
                )
            else:
                res = fit_member(
                    model, X[tr], y[tr], X[va], y[va], cfg=cfg, stages=_stages(cfg, arch), **common
                )
            temp = fit_temperature(res.val_logits, y[va])
            logits_h = predict_logits(
                model,
                X[held],
                mean=spec.mean,
                std=spec.std,
                device=device,
                channels_last=cfg.channels_last,
            )
            held_sum[held] += softmax(logits_h, temp)
            held_cnt[held] += 1
            cal_sum[va] += softmax(res.val_logits, temp)
            cal_cnt[va] += 1
            if kfold:
                fold_of[held] = k
            members.append(
                MemberSpec.for_arch(
                    arch,
                    input_size=size,
                    temperature=float(temp),
                    fold=k if kfold else None,
                    pretrained=str(getattr(model, "pretrained_source", "")),
                    metrics={
                        "val_auc": res.best_val_auc,
                        "best_epoch": res.best_epoch,
                        "n_train": len(tr),
                        "n_val": len(va),
                    },
                )
            )
            models.append(model.to("cpu").eval())
            history += [{"member": f"m{m_i}", **row} for row in res.history]
            m_i += 1
    timings["fit_s"] = time.perf_counter() - t_fit

    emit(TrainEvent("phase", message="calibrating, fitting covariate fusion, evaluating"))
    ev = np.flatnonzero(held_cnt > 0)
    ev_probs = held_sum[ev] / held_cnt[ev, None]
    if kfold:
        cal, cal_probs = ev, ev_probs
    else:
        cal = np.flatnonzero(cal_cnt > 0)
        cal_probs = cal_sum[cal] / cal_cnt[cal, None]
    fusion, threshold, metrics, eval_probs = _evaluate(
        cfg, classes, y, covs, cal, cal_probs, ev, ev_probs, fold_of if kfold else None
    )
    metrics["evaluation"] = (
        f"out-of-fold predictions of {cfg.folds}-fold group-aware cross-validation "
        "(covariate fusion and thresholds cross-fitted)"
        if kfold
        else "held-out test part of a group-aware train/val/test split (fusion and threshold "
        "fitted on the validation part)"
    )

    kept = [i for i in range(n) if i not in exclude]
    counts = {c: int(sum(1 for i in kept if labels[i] == c)) for c in classes}
    dsum = dedup.summary(samples)
    training_data = {
        "n_files": n,
        "n_images": len(kept),
        "n_per_class": counts,
        "n_duplicate_groups": dedup.n_duplicate_groups,
        "n_conflicting_groups": dedup.n_conflicting_groups,
        "n_dropped": len(dedup.dropped),
        "n_unreadable": len(unreadable),
        "duplicates": dsum,
        "split": split.record([s.path for s in samples], labels, groups, root=root),
    }
    covariates_used = ["age", "sex"] if fusion is not None else []
    timings["total_s"] = time.perf_counter() - t_start
    manifest = Manifest(
        name=cfg.name,
        version=cfg.version,
        classes=classes,
        positive_classes=list(cfg.positive),
        threshold=float(threshold),
        target_sensitivity=cfg.target_sensitivity,
        body_parts=list(cfg.body_parts),
        preprocess=pcfg.to_dict(),
        covariates=covariates_used,
        members=members,
        fusion=fusion,
        training_data=training_data,
        metrics=metrics,
        command=cfg.command,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        osteoscan_version=__version__,
        extra={"train_config": cfg.to_dict(), "timings": timings},
    )
    final = eval_probs.get("combined", ev_probs)
    report = render_report(y[ev], final, classes, list(cfg.positive), history)
    n_cov = int(sum(not covs[i].is_empty() for i in kept))
    data_summary = {
        "source": detect_source(data),
        "data": str(data),
        "counts": counts,
        "duplicates": dsum,
        "split": metrics["evaluation"] + f"; {len(ev)} images scored",
        "covariates": f"age/sex known for {n_cov} of {len(kept)} images"
        + (" (from --covariates CSV and/or DICOM headers)" if n_cov else "; image-only model"),
    }
    card = write_card(manifest.to_dict(), metrics, data_summary, cfg.command)
    emit(TrainEvent("phase", message="model trained"))
    return TrainResult(manifest, models, card, report, history, {"ids": ev, **eval_probs})


def train(cfg: TrainConfig, progress: ProgressFn | None = None) -> Path:
    """Train per ``cfg`` and write the model package to ``cfg.out``; returns its path."""
    if cfg.out is None:
        raise UsageError("--out is required")
    try:  # fail now, not after an hour of training
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {cfg.out}: {exc}") from exc
    result = train_models(cfg, progress)
    path = save_package(
        cfg.out, result.manifest, result.models, card=result.card, report=result.report
    )
    if progress:
        progress(TrainEvent("done", message=str(path)))
    return path
