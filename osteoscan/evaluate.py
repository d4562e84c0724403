"""``osteoscan evaluate``: run a model package on labelled images and report honest metrics.

The images go through exactly the path that scanning uses: :func:`osteoscan.readers.read_frames`
→ :func:`osteoscan.preprocess.preprocess` (with the package's stored config) →
:class:`osteoscan.ensemble.Ensemble`. Covariates come from DICOM headers, overridden by a
covariates CSV where it has a value.

Three variants are scored when the package has a covariate-fusion model: ``image_only`` (ensemble
probabilities), ``covariates_only`` (age/sex alone, on the images that have them) and
``combined`` (what ``scan`` outputs: fusion where covariates exist, image-only otherwise; only
when at least one image has a covariate). The top-level metrics are those of what ``scan`` would
output. Thresholded metrics use the threshold ``scan`` applies: the package's image-only threshold
for ``image_only``, its fused one for the others.

Class mapping: the data's classes must be classes of the model. When the data has fewer classes
(e.g. a normal-vs-osteoporosis set scored by a 3-class model), the problem is collapsed to the
screening question (positive classes vs the rest, probabilities ``[1 - score, score]``) and the
report says so in ``class_mapping``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.covariates import Covariates, CovariateTable
from osteoscan.errors import UsageError
from osteoscan.metrics import classification_metrics
from osteoscan.train.data import LabelledSample, load_labelled

ProgressFn = Callable[[int, int], None]


def _read_one(path: Path) -> tuple[np.ndarray | None, Covariates, str]:
    """First usable frame of a file → (float image | None, header covariates, error reason)."""
    from osteoscan.readers import read_frames

    frames = read_frames(path)
    for f in frames:
        if f.status == "ok" and f.image is not None:
            return f.image, Covariates(age=f.age, sex=f.sex), ""
    reason = "; ".join(f"{f.status}: {f.reason}" for f in frames) or "no frames"
    return None, Covariates(), reason


def map_classes(
    data_classes: Sequence[str], model_classes: Sequence[str], positive: Sequence[str]
) -> tuple[list[str], list[str], str]:
    """(evaluation classes, evaluation positive classes, mode) for data vs model classes.

    mode ``"direct"``: the model's classes as they are; ``"collapsed"``: positive vs rest.
    Raises :class:`UsageError` when a data class is not a class of the model.
    """
    foreign = [c for c in data_classes if c not in model_classes]
    if foreign:
        raise UsageError(
            f"data class(es) {', '.join(foreign)} are not classes of the model "
            f"({', '.join(model_classes)}); evaluate on data with the model's classes"
        )
    pos_present = any(c in positive for c in data_classes)
    neg_present = any(c not in positive for c in data_classes)
    if set(data_classes) != set(model_classes) and pos_present and neg_present:
        pos_name = "+".join(positive)
        return ["other", pos_name], [pos_name], "collapsed"
    return list(model_classes), list(positive), "direct"


def _metrics_for(
    labels: Sequence[str],
    probs: np.ndarray,
    model_classes: Sequence[str],
    positive: Sequence[str],
    eval_classes: Sequence[str],
    eval_positive: Sequence[str],
    mode: str,
    threshold: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    if mode == "collapsed":
        pos_idx = [list(model_classes).index(c) for c in positive]
        score = probs[:, pos_idx].sum(axis=1)
        probs = np.stack([1.0 - score, score], axis=1)
        y = np.array([1 if lab in positive else 0 for lab in labels], dtype=np.int64)
    else:
        y = np.array([list(eval_classes).index(lab) for lab in labels], dtype=np.int64)
    return classification_metrics(
        y, probs, eval_classes, eval_positive, threshold, n_boot=n_boot, seed=seed
    )


def evaluate_model(
    data: str | Path,
    model_ref: str | Path | None,
    covariates_csv: str | Path | None = None,
    covariate_columns: Sequence[str] = ("path", "age", "sex"),
    device: str = "auto",
    batch_size: int = 16,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score labelled images (``--data DIR|CSV``) with a model package and compute metrics.

    Returns a JSON-able dict: the top-level metric keys of :func:`classification_metrics`
    (``accuracy``, ``sensitivity``, ``specificity``, ``precision``, ``f1``, ``roc_auc``,
    ``confusion_matrix``, ``n``, ``per_class``...) for the scan-time output, plus ``model``,
    ``classes``, ``threshold``, ``class_mapping``, ``variants`` (``image_only`` and, when the model
    fuses covariates, ``covariates_only`` and ``combined``), ``covariates`` coverage, ``data``
    counts and ``errors`` (unreadable files, excluded from the metrics).
    """
    from osteoscan.ensemble import Ensemble
    from osteoscan.package import load_package
    from osteoscan.preprocess import PreprocessConfig, preprocess
    from osteoscan.runtime import select_device

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    samples, data_classes = load_labelled(data)
    table = None
    if covariates_csv is not None:
        cols = list(covariate_columns)
        if len(cols) != 3:
            raise UsageError("--covariate-columns needs three names: path,age,sex")
        table = CovariateTable.from_csv(covariates_csv, *cols)
    root = Path(data) if Path(data).is_dir() else Path(data).parent

    dev = select_device(device)
    pkg = load_package(model_ref, device="cpu")
    ens = Ensemble(pkg, dev)
    man = pkg.manifest
    model_classes, positive = list(man.classes), list(man.positive_classes)
    eval_classes, eval_positive, mode = map_classes(data_classes, model_classes, positive)
    cfg = PreprocessConfig.from_dict(man.preprocess)

    errors: list[dict[str, str]] = []
    kept: list[LabelledSample] = []
    covs: list[Covariates] = []
    img_probs: list[np.ndarray] = []
    fused_probs: list[np.ndarray] = []
    fused_with: list[str] = []
    batch_x: list[np.ndarray] = []
    batch_c: list[Covariates] = []

    def flush() -> None:
        if not batch_x:
            return
        import torch

        x = torch.from_numpy(np.stack(batch_x)[:, None])
        pred = ens.predict(x, covariates=list(batch_c))
        img_probs.append(pred.member_probs.mean(axis=1))
        fused_probs.append(pred.probs)
        fused_with.extend(pred.covariates_used)
        batch_x.clear()
        batch_c.clear()

    for k, s in enumerate(samples):
        image, header_cov, reason = _read_one(s.path)
        if image is None:
            errors.append({"path": str(s.path), "reason": reason})
        else:
            cov = header_cov.override(table.lookup(s.path, root) if table else None)
            kept.append(s)
            covs.append(cov)
            batch_x.append(preprocess(image, cfg))
            batch_c.append(cov)
            if len(batch_x) >= batch_size:
                flush()
        if progress is not None:
            progress(k + 1, len(samples))
    flush()
    if not kept:
        raise UsageError(f"--data {data}: none of the {len(samples)} images could be read")

    labels = [s.label for s in kept]
    p_img = np.concatenate(img_probs).astype(np.float64)
    p_comb = np.concatenate(fused_probs).astype(np.float64)
    # Image-only and fused scores live on different scales and have their own thresholds, exactly
    # as scan applies them (Ensemble._row_thresholds); packages without per-variant thresholds
    # use the one threshold for both.
    per_variant = (man.fusion or {}).get("thresholds") or {}
    thr_img = float(per_variant.get("image_only", ens.threshold))
    thr_comb = float(per_variant.get("combined", ens.threshold))
    args_img = (model_classes, positive, eval_classes, eval_positive, mode, thr_img, n_boot, seed)
    args = (model_classes, positive, eval_classes, eval_positive, mode, thr_comb, n_boot, seed)
    variants: dict[str, Any] = {"image_only": _metrics_for(labels, p_img, *args_img)}
    n_fused = sum(1 for u in fused_with if u)
    # With no covariate on any image, "combined" is the image-only result again: not reported as
    # a second, identical table that suggests age and sex were used.
    if man.fusion is not None and n_fused:
        from osteoscan.fusion import apply_covariates_only

        ages = [c.age for c in covs]
        sexes = [c.sex for c in covs]
        p_cov, used = apply_covariates_only(man.fusion, ages, sexes)
        rows = [i for i, u in enumerate(used) if u]
        if rows:
            sub = [labels[i] for i in rows]
            if len(set(sub)) >= 2:
                variants["covariates_only"] = _metrics_for(
                    sub, p_cov[rows].astype(np.float64), *args
                )
        variants["combined"] = _metrics_for(labels, p_comb, *args)
    primary = "combined" if "combined" in variants else "image_only"

    result: dict[str, Any] = dict(variants[primary])
    counts = {c: sum(1 for s in kept if s.label == c) for c in data_classes}
    note = (
        f"data classes {data_classes} are a subset of the model's {model_classes}: evaluated as "
        f"{'+'.join(positive)} vs rest (probabilities [1 - score, score])"
        if mode == "collapsed"
        else "direct"
    )
    result.update(
        {
            "primary": primary,
            "model": {"name": man.name, "version": man.version, "path": str(pkg.path)},
            "classes": eval_classes,
            "model_classes": model_classes,
            "threshold": thr_comb if primary == "combined" else thr_img,
            "thresholds": {"image_only": thr_img, "combined": thr_comb},
            "class_mapping": {"mode": mode, "note": note},
            "variants": variants,
            "covariates": {
                "csv": str(covariates_csv) if covariates_csv else None,
                "n_with_age": sum(1 for c in covs if c.age is not None),
                "n_with_sex": sum(1 for c in covs if c.sex is not None),
                "n_with_any": sum(1 for c in covs if not c.is_empty()),
                "n_fused": n_fused,
                "model_uses": list(man.covariates),
            },
            "data": {
                "path": str(data),
                "n_images": len(samples),
                "n_scored": len(kept),
                "counts": counts,
            },
            "errors": errors,
        }
    )
    return result
