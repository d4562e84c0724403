"""``osteoscan train`` as a library call: labelled images in, a calibrated model package out.

Pipeline (:func:`train`):

1. :func:`~osteoscan.train.data.load_labelled` → every file through the load stage once
   (:class:`~osteoscan.train.cache.ImageCache`: the same guards, routing, frames and
   preprocessing as ``scan``); :mod:`~osteoscan.train.images` keeps the usable frames and
   refuses data that cannot work (:func:`~osteoscan.train.images.refuse_unusable`, exit 2).
2. :func:`~osteoscan.train.dedup.find_duplicates`: conflicting duplicate groups dropped; every
   group (duplicates, explicit patient groups, the frames of one file) stays on one side of
   every split.
3. Covariates: DICOM header age/sex, overridden by ``--covariates CSV``
   (:class:`~osteoscan.covariates.CovariateTally` logs the sources and the CSV's problems).
4. Split and members (:mod:`~osteoscan.train.members`): one stratified group-aware
   train/val/test split, or K folds whose models are the ensemble's members, each with a
   temperature (:func:`~osteoscan.train.calibrate.fit_temperature`).
   Under ``torchrun`` the members are spread over the processes, or one member is trained with
   DistributedDataParallel (:mod:`~osteoscan.train.distributed`); rank 0 alone reads the data
   and does the steps after this one.
5. Fusion + operating point + held-out metrics (:mod:`~osteoscan.train.heldout`), with bootstrap
   intervals, into the manifest and the card, with the fingerprints of the training images
   (:mod:`~osteoscan.train.fingerprints`).
6. :func:`osteoscan.package.save_package` with card and report PNGs.

The core reports progress through a callback of :class:`~osteoscan.train.loop.TrainEvent`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osteoscan import __version__
from osteoscan.archs import get_arch
from osteoscan.card import detect_source, write_card
from osteoscan.covariates import Covariates, CovariateSummary, CovariateTally
from osteoscan.errors import OutputError, UsageError
from osteoscan.metrics import tscore_metrics
from osteoscan.package import Manifest, save_package
from osteoscan.preprocess import PreprocessConfig
from osteoscan.report import render_report
from osteoscan.rows import utc_now
from osteoscan.runtime import configure_allocator, select_device
from osteoscan.train.cache import ImageCache
from osteoscan.train.data import load_labelled, resolve_positive
from osteoscan.train.dedup import DedupResult, find_duplicates
from osteoscan.train.distributed import Dist, fit_members_distributed, launch, shutdown
from osteoscan.train.fingerprints import fingerprint_record
from osteoscan.train.heldout import evaluate_heldout
from osteoscan.train.images import TrainingSet, build_training_set, refuse_unusable
from osteoscan.train.loop import TrainEvent
from osteoscan.train.members import (
    FoldParts,
    Members,
    fit_members,
    fold_parts,
    images_needed,
    make_split,
)
from osteoscan.train.recipe import TrainConfig
from osteoscan.train.splits import Split

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


@dataclass
class _Data:
    """The training data after loading, de-duplication and covariates (one row per frame)."""

    data: Path
    root: Path
    classes: list[str]
    pcfg: PreprocessConfig
    ts: TrainingSet
    dedup: DedupResult
    covs: list[Covariates]
    cov_summary: CovariateSummary
    X: torch.Tensor
    y: np.ndarray
    tscores: np.ndarray | None = None  # per sample, for --target tscore

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.ts.samples]

    @property
    def kept(self) -> list[int]:
        dropped = set(self.dedup.dropped)
        return [i for i in range(len(self.ts.samples)) if i not in dropped]


def _labelled(cfg: TrainConfig, emit: ProgressFn) -> tuple[Path, Any, list[str]]:
    if cfg.data is None:
        raise UsageError("--data is required")
    data = Path(cfg.data)
    for arch in cfg.archs:
        get_arch(arch)  # unknown names fail before any image is read
    emit(TrainEvent("phase", message=f"loading labelled data from {data}"))
    files, classes = load_labelled(data, cfg.classes, target=cfg.target)
    if len(classes) < 2:
        raise UsageError(f"need at least two classes, found {classes}")
    # Settled here, once the classes are known; the manifest stores the resolved names.
    cfg.positive = resolve_positive(classes, cfg.positive)
    counts = {c: sum(1 for f in files if f.label == c) for c in classes}
    emit(TrainEvent("phase", message="classes: " + ", ".join(f"{c} ({n})" for c, n in
                                                               counts.items())
                    + f"; screening-positive: {', '.join(cfg.positive)}"))  # fmt: skip
    return data, files, classes


def _covariates(
    cfg: TrainConfig, ts: TrainingSet, root: Path, emit: ProgressFn
) -> tuple[list[Covariates], CovariateSummary]:
    tally = CovariateTally.from_csv(cfg.covariates_csv, cfg.covariate_columns)
    covs = [
        tally.resolve(Covariates(it.age, it.sex), s.path, root)
        for s, it in zip(ts.samples, ts.items, strict=True)
    ]
    summary = tally.summary()
    emit(TrainEvent("phase", message=summary.line()))
    for text in summary.warnings():
        emit(TrainEvent("warning", message=text))
    return covs, summary


def _load_data(cfg: TrainConfig, emit: ProgressFn) -> _Data:
    """Labelled files → usable frames, de-duplicated, refused when they cannot work."""
    data, files, classes = _labelled(cfg, emit)
    size = cfg.size or get_arch(cfg.archs[0]).default_size
    pcfg = PreprocessConfig.from_dict({**cfg.preprocess, "size": size})
    root = data if data.is_dir() else data.parent
    emit(TrainEvent("phase", message=f"reading and preprocessing {len(files)} images"))
    cache = ImageCache(pcfg, cfg.cache_dir, body_parts=cfg.body_parts)
    records = cache.load_all(
        [s.path for s in files], workers=cfg.read_workers or min(8, os.cpu_count() or 1),
        progress=lambda i, n: emit(TrainEvent("read", step=i, n_steps=n)),
    )  # fmt: skip
    ts = build_training_set(files, records)
    emit(TrainEvent("phase", message=ts.line()))
    emit(TrainEvent("phase", message="finding duplicates"))
    dedup = find_duplicates(
        ts.samples, [it.fingerprint for it in ts.items], file_hashes=[it.sha256 for it in ts.items]
    )
    dropped = set(dedup.dropped)
    refuse_unusable(
        ts, classes, [None if i in dropped else g for i, g in enumerate(dedup.group_of)],
        images_needed(cfg), max_unreadable=cfg.max_unreadable,
        allow_unreadable=cfg.allow_unreadable,
    )  # fmt: skip
    covs, cov_summary = _covariates(cfg, ts, root, emit)
    X = torch.from_numpy(np.stack([it.image for it in ts.items if it.image is not None]))[:, None]
    y = np.array([classes.index(s.label) for s in ts.samples], dtype=np.int64)
    t = None
    if cfg.target == "tscore":
        t = np.array([s.value for s in ts.samples], dtype=np.float64)
    return _Data(data, root, classes, pcfg, ts, dedup, covs, cov_summary, X, y, t)


def _training_data(d: _Data, split: Split) -> dict[str, Any]:
    """The manifest's ``training_data``: counts, files not used, duplicates, split, covariates."""
    kept, labels = d.kept, d.labels

    def rel(path: str) -> str:
        prefix = str(d.root).rstrip("/\\") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path

    return {
        "n_files": len(d.ts.files),
        "n_images": len(kept),
        "n_per_class": {c: int(sum(1 for i in kept if labels[i] == c)) for c in d.classes},
        "n_duplicate_groups": d.dedup.n_duplicate_groups,
        "n_conflicting_groups": d.dedup.n_conflicting_groups,
        "n_dropped": len(d.dedup.dropped),
        "n_unreadable": len(d.ts.not_used("error")),
        "n_skipped": len(d.ts.not_used("skipped")),
        "not_used": [
            {"path": rel(p), "status": status, "reason": why}
            for status in ("error", "skipped")
            for p, why in d.ts.not_used(status)
        ],
        "duplicates": d.dedup.summary(d.ts.samples),
        "covariates": d.cov_summary.to_dict(),
        "split": split.record(d.ts.frame_names(), labels, d.dedup.group_of, root=d.root),
    }


def _fingerprints(d: _Data, parts: list[FoldParts]) -> dict[str, Any]:
    """Fingerprints of the frames some member was fitted on (train or validation part)."""
    trained = sorted({i for tr, va, _ in parts for i in (*tr, *va)})
    items = [d.ts.items[i] for i in trained]
    return fingerprint_record(
        (it.sha256 for it in items), (it.fingerprint.pixel_hash for it in items if it.fingerprint)
    )


def _throughput(history: list[dict[str, Any]]) -> dict[str, float]:
    """Training speed per stage over all members: median images/s (``<stage>_img_s``), the
    median validation forward rate (``val_img_s``) and the seconds spent caching frozen
    features (``frozen_features_s``)."""
    rates: dict[str, list[float]] = {}
    for row in history:
        if row.get("train_img_s"):
            rates.setdefault(f"{row.get('stage')}_img_s", []).append(float(row["train_img_s"]))
        if row.get("val_img_s"):
            rates.setdefault("val_img_s", []).append(float(row["val_img_s"]))
    out = {k: float(np.median(v)) for k, v in rates.items()}
    cache = sum(float(row.get("cache_s") or 0.0) for row in history)
    if cache:  # one-off frozen-feature passes (train.frozen): not in the per-epoch rates
        out["frozen_features_s"] = cache
    return out


def _evaluation_text(cfg: TrainConfig) -> str:
    if cfg.folds >= 2:
        return (
            f"out-of-fold predictions of {cfg.folds}-fold group-aware cross-validation "
            "(covariate fusion and thresholds cross-fitted)"
        )
    return (
        "held-out test part of a group-aware train/val/test split (fusion and threshold "
        "fitted on the validation part)"
    )


def _card(
    cfg: TrainConfig, d: _Data, manifest: Manifest, metrics: dict[str, Any], n_ev: int
) -> str:
    kept = d.kept
    n_cov = int(sum(not d.covs[i].is_empty() for i in kept))
    data_summary = {
        "source": detect_source(d.data),
        "data": str(d.data),
        "counts": manifest.training_data["n_per_class"],
        "duplicates": manifest.training_data["duplicates"],
        "split": metrics["evaluation"] + f"; {n_ev} images scored",
        "covariates": f"age/sex known for {n_cov} of {len(kept)} images"
        + (" (from --covariates CSV and/or DICOM headers)" if n_cov else "; image-only model"),
    }
    return write_card(manifest.to_dict(), metrics, data_summary, cfg.command)


def _evaluate(cfg: TrainConfig, d: _Data, members: Members) -> tuple[Any, ...]:
    """Held-out rows, their probabilities, and :func:`evaluate_heldout`'s results."""
    kfold = cfg.folds >= 2
    ev, ev_probs = members.held_out()
    cal, cal_probs = (ev, ev_probs) if kfold else members.validation()
    fold_of = members.fold_of if kfold else None
    res = evaluate_heldout(cfg, d.classes, d.y, d.covs, cal, cal_probs, ev, ev_probs, fold_of)
    res[3]["evaluation"] = _evaluation_text(cfg)
    return ev, ev_probs, *res


def _with_cutoffs(target: dict[str, Any] | None, cutoffs: list[float] | None) -> Any:
    """The manifest's ``target``, with an ordinal model's grade cut-offs (osteoscan.grades)."""
    return target if not cutoffs or not target else {**target, "grade_cutoffs": cutoffs}


def train_models(
    cfg: TrainConfig, progress: ProgressFn | None = None, dist: Dist | None = None
) -> TrainResult:
    """Run the whole pipeline in memory; see the module docstring. :func:`train` saves it.

    ``dist``: rank 0 of a torchrun launch (:func:`~osteoscan.train.distributed.launch`).
    """
    cfg.validate()
    emit = progress or (lambda _e: None)
    t_start = time.perf_counter()
    configure_allocator()  # without it, page faults take half of a CPU epoch (osteoscan.runtime)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device)
    device = dist.device(device) if dist is not None else device
    d = _load_data(cfg, emit)
    timings = {"read_s": time.perf_counter() - t_start}
    split = make_split(cfg, d.labels, d.dedup.group_of, set(d.dedup.dropped))
    split.check_disjoint(d.dedup.group_of)
    parts = fold_parts(cfg, split, d.labels, d.dedup.group_of)
    t_fit = time.perf_counter()
    pos_idx = [d.classes.index(c) for c in cfg.positive]
    fit_args = (d.X, d.y, parts, len(d.classes), pos_idx)
    if dist is None:
        members = fit_members(cfg, *fit_args, device, emit, tscores=d.tscores)
    else:
        # The other ranks wait in _serve for this (uint16 tensors do not pickle: NumPy does).
        dist.share((d.X.numpy(), *fit_args[1:], d.tscores), "data")
        fitted = fit_members_distributed(dist, cfg, *fit_args, device, emit, tscores=d.tscores)
        assert fitted is not None  # rank 0 gets every member
        members = fitted
    timings["fit_s"] = time.perf_counter() - t_fit
    timings["read_img_s"] = len(d.ts.files) / max(timings["read_s"], 1e-9)

    emit(TrainEvent("phase", message="calibrating, fitting covariate fusion, evaluating"))
    ev, ev_probs, fusion, threshold, img_threshold, metrics, eval_probs = _evaluate(cfg, d, members)
    if d.tscores is not None:
        # The predicted T-score is image-only (fusion changes the categories, not the T-score).
        metrics["image_only"]["tscore"] = tscore_metrics(
            d.tscores[ev], members.held_tscores(ev), n_boot=cfg.n_boot, seed=cfg.seed
        )
    timings.update(_throughput(members.history))
    timings["total_s"] = time.perf_counter() - t_start
    manifest = Manifest(
        name=cfg.name, version=cfg.version, classes=d.classes,
        positive_classes=list(cfg.positive), threshold=threshold,
        image_only_threshold=img_threshold,
        target_sensitivity=cfg.target_sensitivity, body_parts=list(cfg.body_parts),
        preprocess=d.pcfg.to_dict(), covariates=["age", "sex"] if fusion is not None else [],
        members=members.specs, fusion=fusion, training_data=_training_data(d, split),
        metrics=metrics, command=cfg.command,
        created_at=utc_now(),
        osteoscan_version=__version__,
        extra={"train_config": cfg.to_dict(), "timings": timings},
        training_fingerprints=_fingerprints(d, parts),
        target=_with_cutoffs(members.target(), metrics.pop("grade_cutoffs", None)),
    )  # fmt: skip
    final = eval_probs.get("combined", ev_probs)
    report = render_report(d.y[ev], final, d.classes, list(cfg.positive), members.history)
    card = _card(cfg, d, manifest, metrics, len(ev))
    emit(TrainEvent("phase", message="model trained"))
    return TrainResult(
        manifest, members.models, card, report, members.history, {"ids": ev, **eval_probs}
    )


def _serve(dist: Dist, cfg: TrainConfig) -> None:
    """A rank other than 0: fit this rank's members on rank 0's data, hand them over."""
    cfg.validate()
    configure_allocator()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = dist.device(select_device(cfg.device))
    X, y, parts, n_classes, pos_idx, tscores = dist.share(None, "data")
    fit_members_distributed(dist, cfg, torch.from_numpy(X), y, parts, n_classes, pos_idx, device,
                            lambda _e: None, tscores=tscores)  # fmt: skip


def train(cfg: TrainConfig, progress: ProgressFn | None = None) -> Path | None:
    """Train per ``cfg`` and write the model package to ``cfg.out``; returns its path.

    Under ``torchrun`` every rank calls this: rank 0 returns the path, the others ``None``
    (they write nothing and report no progress).
    """
    if cfg.out is None:
        raise UsageError("--out is required")
    dist = launch(cfg.device, cfg.num_threads)
    try:
        guard = dist.guard() if dist is not None else contextlib.nullcontext()
        with guard:
            if dist is not None and dist.rank != 0:
                _serve(dist, cfg)
                return None
            try:  # fail now, not after an hour of training
                Path(cfg.out).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create --out {cfg.out}: {exc}") from exc
            result = train_models(cfg, progress, dist)
            path = save_package(
                cfg.out, result.manifest, result.models, card=result.card, report=result.report
            )
    finally:
        shutdown()
    if progress:
        progress(TrainEvent("done", message=str(path)))
    return path
