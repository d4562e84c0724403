"""``osteoscan evaluate``: run a model package on labelled images and report honest metrics.

The images go through exactly the path that scanning uses: the load stage
(:func:`osteoscan.load.single_model_loader`: guarded read, gate, routing by body part, the
package's preprocessing, every frame of a multi-frame file) → :class:`osteoscan.ensemble.Ensemble`.
A file ``scan`` skips or refuses is listed as ``skipped`` or ``error`` and left out of the metrics;
``frames`` in the report has one row per frame, as the scan's results would. Covariates come from
DICOM headers, overridden by a covariates CSV where it has a value
(:class:`~osteoscan.covariates.CovariateTally` says how many images got them from where, and what
in the CSV could not be used).

When the package records fingerprints of its training images
(:mod:`osteoscan.train.fingerprints`), images it was trained on are counted and a warning says
so: metrics on training images are not an estimate of performance on new ones.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from osteoscan.covariates import Covariates, CovariateSummary, CovariateTally
from osteoscan.errors import UsageError
from osteoscan.grades import grade_cutoffs_of, predict_classes
from osteoscan.hashing import file_sha256
from osteoscan.metrics import classification_metrics
from osteoscan.train.data import LabelledSample, load_labelled
from osteoscan.train.dedup import pixel_hash
from osteoscan.train.fingerprints import TrainingFingerprints

if TYPE_CHECKING:
    from osteoscan.load import LoadedFrame, Loader

ProgressFn = Callable[[int, int], None]
EXAMPLES = 5  # paths quoted in a warning


@dataclass
class _Scored:
    """What scoring the data gave: per-frame rows, the scored frames' labels and probabilities."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    covs: list[Covariates] = field(default_factory=list)
    img_probs: list[np.ndarray] = field(default_factory=list)
    fused_probs: list[np.ndarray] = field(default_factory=list)
    fused_with: list[str] = field(default_factory=list)
    seen: dict[str, list[str]] = field(default_factory=lambda: {"file": [], "pixels": []})
    data_classes: list[str] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)  # true T-scores (path,tscore CSV)
    member_probs: list[np.ndarray] = field(default_factory=list)  # (B, M, C) per batch

    def not_scored(self, status: str) -> list[dict[str, Any]]:
        """Frames with ``status`` (``error`` or ``skipped``): path, frame and reason."""
        return [
            {k: f[k] for k in ("path", "frame", "reason")}
            for f in self.frames
            if f["status"] == status
        ]


class _Scorer:
    """Scores loaded frames in batches; checks each against the training fingerprints."""

    def __init__(self, ens: Any, fps: TrainingFingerprints | None, batch_size: int) -> None:
        self.ens, self.fps, self.batch_size = ens, fps, batch_size
        self.out = _Scored()
        self._x: list[np.ndarray] = []
        self._c: list[Covariates] = []
        self._sha: dict[str, str] = {}

    def add(self, rec: LoadedFrame, label: str, cov: Covariates, value: float | None) -> None:
        """One scorable frame: batched, and checked against the training set."""
        assert rec.pixels is not None
        self.out.labels.append(label)
        self.out.values.append(value)
        self.out.covs.append(cov)
        self._x.append(rec.pixels)
        self._c.append(cov)
        if self.fps is not None:
            if rec.path not in self._sha:
                self._sha[rec.path] = file_sha256(rec.path)
            ph = pixel_hash(rec.image) if rec.image is not None else None
            kind = self.fps.match(self._sha[rec.path], ph)
            if kind is not None:
                self.out.seen[kind].append(rec.path)
        if len(self._x) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Score the frames batched so far."""
        if not self._x:
            return
        import torch

        x = torch.from_numpy(np.stack(self._x)[:, None])
        pred = self.ens.predict(x, covariates=list(self._c))
        self.out.img_probs.append(pred.member_probs.mean(axis=1))
        self.out.member_probs.append(pred.member_probs)
        self.out.fused_probs.append(pred.probs)
        self.out.fused_with.extend(pred.covariates_used)
        self._x.clear()
        self._c.clear()


def _score(
    samples: Sequence[LabelledSample], load: Loader, scorer: _Scorer, tally: CovariateTally,
    root: Path, progress: ProgressFn | None,
) -> _Scored:  # fmt: skip
    """Load every file (one record per frame) and score the usable frames."""
    out = scorer.out
    for k, s in enumerate(samples):
        for rec in load(s.path, root=root):
            row = {"path": rec.path, "frame": rec.frame, "label": s.label, "status": rec.status,
                   "reason": rec.reason}  # fmt: skip
            out.frames.append(row)
            if rec.scorable:
                cov = tally.resolve(Covariates(age=rec.age, sex=rec.sex), s.path, root)
                scorer.add(rec, s.label, cov, s.value)
        if progress is not None:
            progress(k + 1, len(samples))
    scorer.flush()
    return out


def _overlap(scored: _Scored, fps: TrainingFingerprints | None) -> dict[str, Any]:
    """The report's ``training_overlap``: scored images that were in the training data."""
    if fps is None:
        return {"checked": False, "n_images": 0, "note": "the package records no fingerprints "
                "of its training images; overlap with them was not checked"}  # fmt: skip
    paths = scored.seen["file"] + scored.seen["pixels"]
    return {
        "checked": True, "n_images": len(paths), "n_scored": len(scored.labels),
        "same_file": len(scored.seen["file"]), "same_pixels": len(scored.seen["pixels"]),
        "examples": paths[:EXAMPLES],
    }  # fmt: skip


def _warnings(overlap: dict[str, Any], cov_summary: CovariateSummary) -> list[str]:
    out = []
    n = overlap["n_images"]
    if n:
        out.append(
            f"{n} of {overlap['n_scored']} scored images were in the model's training data "
            f"({overlap['same_file']} identical files, {overlap['same_pixels']} identical "
            f"pixels; e.g. {', '.join(overlap['examples'])}): metrics on them overstate how "
            "the model does on new images; evaluate on images it was not trained on"
        )
    return out + cov_summary.warnings()


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
    ordinal: bool = False,
    cutoffs: list[float] | None = None,
) -> dict[str, Any]:
    """Metrics of one variant's probabilities, in the evaluation's classes (``mode``)."""
    direct = mode == "direct"
    pred = predict_classes(probs, cutoffs) if cutoffs is not None and direct else None
    if mode == "collapsed":
        pos_idx = [list(model_classes).index(c) for c in positive]
        score = probs[:, pos_idx].sum(axis=1)
        probs = np.stack([1.0 - score, score], axis=1)
        y = np.array([1 if lab in positive else 0 for lab in labels], dtype=np.int64)
    else:
        y = np.array([list(eval_classes).index(lab) for lab in labels], dtype=np.int64)
    return classification_metrics(
        y, probs, eval_classes, eval_positive, threshold, n_boot=n_boot, seed=seed,
        ordinal=ordinal and direct, pred=pred,
    )  # fmt: skip


def _variants(
    man: Any, sc: _Scored, classes: tuple[list[str], list[str], list[str], list[str], str],
    n_boot: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Metrics of each variant (image only; covariates only and combined when fused)."""
    model_classes, positive, eval_classes, eval_positive, mode = classes
    labels = sc.labels
    p_img = np.concatenate(sc.img_probs).astype(np.float64)
    p_comb = np.concatenate(sc.fused_probs).astype(np.float64)
    # Image-only and fused scores live on different scales and have their own thresholds, exactly
    # as scan applies them (Manifest.threshold_for); packages without an image-only threshold
    # use the one threshold for both.
    thr_img, thr_comb = man.threshold_for(fused=False), man.threshold_for(fused=True)
    ordinal = (man.target or {}).get("kind") == "ordinal"
    cuts = grade_cutoffs_of(man.target)  # ordinal packages: the grade rule scan applies
    args_img = (model_classes, positive, eval_classes, eval_positive, mode, thr_img, n_boot, seed,
                ordinal, cuts)  # fmt: skip
    args = (model_classes, positive, eval_classes, eval_positive, mode, thr_comb, n_boot, seed,
            ordinal, cuts)  # fmt: skip
    variants: dict[str, Any] = {"image_only": _metrics_for(labels, p_img, *args_img)}
    ts = _tscore_block(man, sc, n_boot, seed)
    if ts is not None:
        variants["image_only"]["tscore"] = ts
    # With no covariate on any image, "combined" is the image-only result again: not reported as
    # a second, identical table that suggests age and sex were used.
    if man.fusion is not None and any(sc.fused_with):
        from osteoscan.fusion import apply_covariates_only

        p_cov, used = apply_covariates_only(
            man.fusion, [c.age for c in sc.covs], [c.sex for c in sc.covs]
        )
        rows = [i for i, u in enumerate(used) if u]
        if rows and len({labels[i] for i in rows}) >= 2:
            sub = [labels[i] for i in rows]
            variants["covariates_only"] = _metrics_for(sub, p_cov[rows].astype(np.float64), *args)
        variants["combined"] = _metrics_for(labels, p_comb, *args)
    return variants


def _tscore_block(man: Any, sc: _Scored, n_boot: int, seed: int) -> dict[str, Any] | None:
    """T-score metrics of a T-score model on data with T-scores (None otherwise)."""
    target = man.target or {}
    if target.get("kind") != "tscore" or not sc.values or None in sc.values:
        return None
    from osteoscan.metrics import tscore_metrics
    from osteoscan.train.tscore import member_scales, tscore_from_probs

    temps = [float(m.temperature) for m in man.members]
    pred = tscore_from_probs(np.concatenate(sc.member_probs), member_scales(target, temps))
    true = np.array(sc.values, dtype=np.float64)
    return tscore_metrics(true, pred, n_boot=n_boot, seed=seed)


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
    body_part: str | None = None,
) -> dict[str, Any]:
    """Score labelled images (``--data DIR|CSV``) with a model package and compute metrics.

    Returns a JSON-able dict: the top-level metric keys of :func:`classification_metrics`
    (``accuracy``, ``sensitivity``, ``specificity``, ``precision``, ``f1``, ``roc_auc``,
    ``confusion_matrix``, ``n``, ``per_class``...) for the scan-time output, plus ``model``,
    ``classes``, ``threshold``, ``class_mapping``, ``variants`` (``image_only`` and, when the model
    fuses covariates, ``covariates_only`` and ``combined``), ``covariates`` coverage and sources,
    ``data`` counts, ``frames`` (one row per frame: path, frame, label, status, reason),
    ``errors`` and ``skipped`` (left out of the metrics), ``training_overlap`` and ``warnings``.
    ``body_part`` is ``--body-part`` for files that state none (``None``: the part the model
    serves), as in a scan.
    """
    from osteoscan.ensemble import Ensemble
    from osteoscan.load import single_model_loader
    from osteoscan.package import load_package
    from osteoscan.preprocess import PreprocessConfig
    from osteoscan.runtime import configure_allocator, select_device

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    configure_allocator()  # the page-fault storm of big activations (osteoscan.runtime)
    samples, data_classes = load_labelled(data)
    cols = list(covariate_columns)
    if len(cols) != 3:
        raise UsageError("--covariate-columns needs three names: path,age,sex")
    tally = CovariateTally.from_csv(covariates_csv, cols)
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    pkg = load_package(model_ref, device="cpu")
    man = pkg.manifest
    model_classes, positive = list(man.classes), list(man.positive_classes)
    mapping = (model_classes, positive, *map_classes(data_classes, model_classes, positive))
    fps = TrainingFingerprints.from_record(man.training_fingerprints)
    cfg = PreprocessConfig.from_dict(man.preprocess)
    try:
        load = single_model_loader(cfg, man.body_parts, body_part=body_part, keep_image=bool(fps))
    except ValueError as exc:  # an unknown --body-part
        raise UsageError(str(exc)) from exc
    scorer = _Scorer(Ensemble(pkg, select_device(device)), fps, batch_size)
    sc = _score(samples, load, scorer, tally, root, progress)
    sc.data_classes = data_classes
    if not sc.labels:
        raise UsageError(f"--data {data}: none of the {len(samples)} images could be scored")
    variants = _variants(man, sc, mapping, n_boot, seed)
    return _report(data, covariates_csv, pkg, mapping, variants, sc, tally, fps, len(samples))


def _report(
    data: str | Path, covariates_csv: str | Path | None, pkg: Any,
    mapping: tuple[list[str], list[str], list[str], list[str], str], variants: dict[str, Any],
    sc: _Scored, tally: CovariateTally, fps: TrainingFingerprints | None, n_files: int,
) -> dict[str, Any]:  # fmt: skip
    """The JSON-able report (see :func:`evaluate_model`)."""
    man = pkg.manifest
    model_classes, positive, eval_classes, _, mode = mapping
    primary = "combined" if "combined" in variants else "image_only"
    thr_img, thr_comb = man.threshold_for(fused=False), man.threshold_for(fused=True)
    note = (
        f"data classes {sc.data_classes} are a subset of the model's {model_classes}: evaluated as "
        f"{'+'.join(positive)} vs rest (probabilities [1 - score, score])"
        if mode == "collapsed"
        else "direct"
    )
    covs, cov_summary = sc.covs, tally.summary()
    overlap = _overlap(sc, fps)
    result: dict[str, Any] = dict(variants[primary])
    if "tscore" in variants["image_only"]:  # image-only either way: fusion leaves T alone
        result["tscore"] = variants["image_only"]["tscore"]
    result.update({
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
            "n_fused": sum(1 for u in sc.fused_with if u),
            "model_uses": list(man.covariates),
            "sources": cov_summary.to_dict(),
        },
        "data": {
            "path": str(data), "n_images": n_files, "n_frames": len(sc.frames),
            "n_scored": len(sc.labels), "n_errors": len(sc.not_scored("error")),
            "n_skipped": len(sc.not_scored("skipped")),
            "counts": {c: sc.labels.count(c) for c in sc.data_classes},
        },
        "frames": sc.frames,
        "errors": sc.not_scored("error"),
        "skipped": sc.not_scored("skipped"),
        "training_overlap": overlap,
        "warnings": _warnings(overlap, cov_summary),
    })  # fmt: skip
    return result
