"""Classification metrics with bootstrap 95 % confidence intervals.

Definitions (chosen so the published knee-X-ray tables compare, and documented in the model card):

- ``accuracy``: multi-class accuracy of the predicted class: the most probable class (argmax), as
  the papers report it, or for an ordinal model with fitted grade cut-offs the grade they give
  (:mod:`osteoscan.grades`; ``pred`` argument). ``balanced_accuracy``: mean per-class recall.
  ``screening_accuracy``: accuracy of the binary screening decision below.
- ``sensitivity`` (recall), ``specificity``, ``precision`` (PPV), ``f1``: the *screening* decision,
  positive classes vs the rest, positive when ``score = sum of positive-class probabilities >=
  threshold``. ``npv`` likewise.
- ``roc_auc``: ROC-AUC of ``score`` for positive-vs-rest, with ``per_class`` one-vs-rest AUCs (of
  each class's probability) and their unweighted ``macro`` mean.
- ``per_class``: one-vs-rest sensitivity/specificity/precision/F1 of the predicted class;
  ``macro``: their unweighted means.
- ``confusion_matrix``: counts over all classes, rows = true class, columns = predicted class.
- Ordered classes (``ordinal=True``): ``qwk``, Cohen's quadratic weighted kappa of the predicted
  grade against the true grade, and ``mae``, their mean absolute difference in grades (class
  positions).
- :func:`tscore_metrics`: predicted vs true T-scores: ``mae``, ``rmse``, ``pearson_r`` and the
  ROC-AUCs of the predicted T-score (lower = more positive) for ``osteoporosis`` (T <= -2.5) and
  ``low_bone_mass`` (T < -1).

Every scalar is ``{"value": x, "ci95": [lo, hi]}``: a percentile bootstrap over images
(``n_boot`` resamples with replacement; resamples where a metric is undefined, e.g. one without
any positive image, are skipped). ``stratified=True`` resamples within each true class instead,
which keeps every class in every resample but treats class counts as fixed, so it understates
the uncertainty of prevalence-dependent metrics (accuracy, precision); hence not the default.
Undefined values are ``None`` (JSON null).
The bootstrap is vectorised: each resample is a vector of per-image multiplicities, so all
metrics, AUCs included, are weighted sums over the original images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CI_LEVEL = 0.95
MIN_VALID_RESAMPLES = 20  # fewer defined resamples than this: no interval rather than a fake one


def _encode_truth(y_true: Sequence[Any] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    arr = np.asarray(y_true)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < 0 or arr.max() >= len(classes)):
            raise ValueError("y_true indices out of range of classes")
        return arr.astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([index[str(v)] for v in arr], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(
            f"label {exc.args[0]!r} is not one of the classes {list(classes)}"
        ) from None


def _weights(y: np.ndarray, n_boot: int, seed: int, stratified: bool) -> np.ndarray:
    """(n_boot, N) bootstrap multiplicities; row sums equal N (per class when stratified)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    w = np.zeros((n_boot, n), dtype=np.float64)
    strata = [np.nonzero(y == c)[0] for c in np.unique(y)] if stratified else [np.arange(n)]
    for members in strata:
        m = len(members)
        w[:, members] = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    return w


def _weighted_auc(w: np.ndarray, pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count one half) for each row of weights ``w`` (B, N); NaN if one class."""
    order = np.argsort(score, kind="mergesort")
    s_sorted = score[order]
    starts = np.concatenate([[0], np.nonzero(np.diff(s_sorted))[0] + 1])
    ws = w[:, order]
    p = pos[order].astype(np.float64)
    wp = np.add.reduceat(ws * p, starts, axis=1)  # positive weight per distinct score
    wn = np.add.reduceat(ws * (1.0 - p), starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    num = (wp * (neg_below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _binary(w: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    tp = w @ (truth & pred).astype(np.float64)
    fp = w @ (~truth & pred).astype(np.float64)
    fn = w @ (truth & ~pred).astype(np.float64)
    tn = w @ (~truth & ~pred).astype(np.float64)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }


def _all_metrics(
    w: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    pos_mask: np.ndarray,
    threshold: float,
    classes: Sequence[str],
    pred: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every scalar metric, one value per weight row (``pred``: predicted class indices)."""
    out: dict[str, np.ndarray] = {}
    total = w.sum(axis=1)
    out["accuracy"] = _ratio(w @ (pred == y).astype(np.float64), total)
    score = probs[:, pos_mask].sum(axis=1)
    truth = pos_mask[y]
    screen = _binary(w, truth, score >= threshold)
    for k in ("sensitivity", "specificity", "precision", "npv", "f1"):
        out[k] = screen[k]
    out["screening_accuracy"] = screen["accuracy"]
    out["roc_auc"] = _weighted_auc(w, truth, score)
    per: dict[str, list[np.ndarray]] = {"sensitivity": [], "precision": [], "f1": [], "auc": []}
    for c, name in enumerate(classes):
        ovr = _binary(w, y == c, pred == c)
        for k in ("sensitivity", "specificity", "precision", "f1"):
            out[f"per_class.{name}.{k}"] = ovr[k]
        out[f"roc_auc.{name}"] = _weighted_auc(w, y == c, probs[:, c])
        per["sensitivity"].append(ovr["sensitivity"])
        per["precision"].append(ovr["precision"])
        per["f1"].append(ovr["f1"])
        per["auc"].append(out[f"roc_auc.{name}"])
    # Macro means need every class defined; otherwise the resample says nothing about them.
    out["balanced_accuracy"] = np.mean(per["sensitivity"], axis=0)
    out["macro.precision"] = np.mean(per["precision"], axis=0)
    out["macro.f1"] = np.mean(per["f1"], axis=0)
    out["roc_auc.macro"] = np.mean(per["auc"], axis=0)
    return out


def _ordinal(w: np.ndarray, y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Quadratic weighted kappa and mean absolute grade error, one value per weight row."""
    pair = np.zeros((len(y), k * k))
    pair[np.arange(len(y)), y * k + pred] = 1.0
    obs = (w @ pair).reshape(-1, k, k)  # weighted confusion matrix per resample
    total = obs.sum(axis=(1, 2))
    grid = np.arange(k)
    cost = (grid[:, None] - grid[None, :]) ** 2 / max(1, (k - 1) ** 2)
    expected = obs.sum(axis=2)[:, :, None] * obs.sum(axis=1)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = expected / np.where(total > 0, total, 1.0)[:, None, None]
        num = (cost * obs).sum(axis=(1, 2))
        den = (cost * expected).sum(axis=(1, 2))
        qwk = np.where(den > 0, 1.0 - num / np.where(den > 0, den, 1.0), np.nan)
    return {"qwk": qwk, "mae": _ratio(w @ np.abs(y - pred).astype(np.float64), total)}


def _cell(value: float, boot: np.ndarray | None) -> dict[str, Any]:
    v = None if value is None or not np.isfinite(value) else float(value)
    ci: list[float | None] = [None, None]
    if boot is not None and v is not None:
        good = boot[np.isfinite(boot)]
        if len(good) >= MIN_VALID_RESAMPLES:
            alpha = (1.0 - CI_LEVEL) / 2 * 100
            lo, hi = np.percentile(good, [alpha, 100 - alpha])
            ci = [float(lo), float(hi)]
    return {"value": v, "ci95": ci}


def classification_metrics(
    y_true: Sequence[Any] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_classes: Sequence[str],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    stratified: bool = False,
    ordinal: bool = False,
    pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics of the module docstring, each with a bootstrap 95 % interval, as plain JSON.

    ``y_true``: class indices or class names; ``probs``: (N, C) probabilities in ``classes``
    order. ``n_boot=0`` skips the bootstrap (intervals are ``[None, None]``). ``ordinal``: the
    classes are ordered grades, in ``classes`` order (adds ``qwk`` and ``mae``). ``pred``: the
    predicted class index of each row when it is not the argmax (an ordinal model's grade
    cut-offs, :func:`osteoscan.grades.predict_classes`).
    """
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (N, {len(classes)}), got {probs.shape}")
    unknown = set(positive_classes) - set(classes)
    if unknown or not positive_classes:
        raise ValueError(f"positive classes {sorted(unknown) or '[]'} not among {classes}")
    y = _encode_truth(y_true, classes)
    if len(y) != len(probs):
        raise ValueError("y_true and probs differ in length")
    pos_mask = np.array([c in set(positive_classes) for c in classes])
    rule = "argmax" if pred is None else "grade_cutoffs"
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, dtype=np.int64)
    if len(pred) != len(y):
        raise ValueError("pred and probs differ in length")
    args = (y, probs, pos_mask, threshold, classes, pred)

    point = _all_metrics(np.ones((1, len(y))), *args)
    boot = (
        _all_metrics(_weights(y, n_boot, seed, stratified), *args)
        if n_boot > 0 and len(y) > 0
        else {}
    )

    def cell(key: str) -> dict[str, Any]:
        return _cell(float(point[key][0]), boot.get(key))

    result: dict[str, Any] = {
        "n": int(len(y)),
        "classes": classes,
        "positive_classes": list(positive_classes),
        "threshold": float(threshold),
        "prediction_rule": rule,
        "accuracy": cell("accuracy"),
        "balanced_accuracy": cell("balanced_accuracy"),
        "screening_accuracy": cell("screening_accuracy"),
        "sensitivity": cell("sensitivity"),
        "specificity": cell("specificity"),
        "precision": cell("precision"),
        "npv": cell("npv"),
        "f1": cell("f1"),
        "roc_auc": {
            **cell("roc_auc"),
            "per_class": {c: cell(f"roc_auc.{c}") for c in classes},
            "macro": cell("roc_auc.macro"),
        },
        "macro": {
            "sensitivity": cell("balanced_accuracy"),
            "precision": cell("macro.precision"),
            "f1": cell("macro.f1"),
        },
        "per_class": {
            c: {
                k: cell(f"per_class.{c}.{k}")
                for k in ("sensitivity", "specificity", "precision", "f1")
            }
            for c in classes
        },
        **_counts(y, probs, pos_mask, threshold, classes, pred),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "stratified": bool(stratified)},
    }
    if ordinal:
        k = len(classes)
        o_point = _ordinal(np.ones((1, len(y))), y, pred, k)
        o_boot = (
            _ordinal(_weights(y, n_boot, seed, stratified), y, pred, k)
            if n_boot > 0 and len(y) > 0
            else {}
        )
        for key in ("qwk", "mae"):
            result[key] = _cell(float(o_point[key][0]), o_boot.get(key))
    return result


def _pearson(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    tot = w.sum(axis=1)
    ma, mb = (w @ a) / tot, (w @ b) / tot
    cov = (w @ (a * b)) / tot - ma * mb
    va, vb = (w @ (a * a)) / tot - ma**2, (w @ (b * b)) / tot - mb**2
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt(np.clip(va, 0, None) * np.clip(vb, 0, None))
        return np.where(den > 1e-12, cov / np.where(den > 1e-12, den, 1.0), np.nan)


def _tscore_all(w: np.ndarray, t: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    tot = w.sum(axis=1)
    err = p - t
    return {
        "mae": _ratio(w @ np.abs(err), tot),
        "rmse": np.sqrt(_ratio(w @ (err * err), tot)),
        "pearson_r": _pearson(w, t, p),
        "osteoporosis": _weighted_auc(w, t <= -2.5, -p),
        "low_bone_mass": _weighted_auc(w, t < -1.0, -p),
    }


def tscore_metrics(
    t_true: Sequence[float] | np.ndarray,
    t_pred: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicted vs true T-scores (see the module docstring), bootstrap 95 % intervals."""
    t = np.asarray(t_true, dtype=np.float64)
    p = np.asarray(t_pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError("t_true and t_pred differ in length")
    point = _tscore_all(np.ones((1, len(t))), t, p)
    boot = (
        _tscore_all(_weights(np.zeros(len(t), dtype=np.int64), n_boot, seed, False), t, p)
        if n_boot > 0 and len(t) > 1
        else {}
    )

    def cell(key: str) -> dict[str, Any]:
        return _cell(float(point[key][0]), boot.get(key))

    return {
        "n": int(len(t)),
        "mae": cell("mae"),
        "rmse": cell("rmse"),
        "pearson_r": cell("pearson_r"),
        "roc_auc": {"osteoporosis": cell("osteoporosis"), "low_bone_mass": cell("low_bone_mass")},
    }


def _counts(
    y: np.ndarray, probs: np.ndarray, pos_mask: np.ndarray, threshold: float, classes: list[str],
    pred: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """Confusion matrix (predicted class), screening tp/fp/fn/tn and images per class."""
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    truth = pos_mask[y]
    flagged = probs[:, pos_mask].sum(axis=1) >= threshold
    return {
        "confusion_matrix": {"classes": classes, "matrix": cm.tolist()},
        "screening": {
            "tp": int((truth & flagged).sum()),
            "fp": int((~truth & flagged).sum()),
            "fn": int((truth & ~flagged).sum()),
            "tn": int((~truth & ~flagged).sum()),
        },
        "n_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
    }


def _fmt(cell: dict[str, Any]) -> tuple[str, str]:
    v = cell.get("value")
    lo, hi = (cell.get("ci95") or [None, None])[:2]
    value = "n/a" if v is None else f"{v:.3f}"
    ci = "" if lo is None or hi is None else f"{lo:.3f} – {hi:.3f}"
    return value, ci


_RULES = {"argmax": "argmax", "grade_cutoffs": "grade cut-offs"}


def format_metrics_table(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows ``(metric, value, 95 % CI)`` for rendering a metrics dict as a table."""
    pos = "+".join(metrics.get("positive_classes", [])) or "positive"
    thr = metrics.get("threshold")
    at = f" @ {thr:.3f}" if isinstance(thr, (int, float)) else ""
    rows: list[tuple[str, str, str]] = [("n (images)", str(metrics.get("n", "")), "")]
    named = [
        ("accuracy", f"accuracy ({_RULES.get(str(metrics.get('prediction_rule')), 'argmax')})"),
        ("balanced_accuracy", "balanced accuracy"),
        ("sensitivity", f"sensitivity ({pos} vs rest{at})"),
        ("specificity", f"specificity ({pos} vs rest{at})"),
        ("precision", f"precision ({pos} vs rest{at})"),
        ("f1", f"F1 ({pos} vs rest{at})"),
        ("roc_auc", f"ROC-AUC ({pos} vs rest)"),
    ]
    for key, label in named:
        if key in metrics:
            rows.append((label, *_fmt(metrics[key])))
    if "qwk" in metrics:
        rows.append(("quadratic weighted kappa (grades)", *_fmt(metrics["qwk"])))
        rows.append(("mean absolute grade error", *_fmt(metrics["mae"])))
    ts = metrics.get("tscore")
    if isinstance(ts, dict):
        rows.append(("T-score MAE", *_fmt(ts["mae"])))
        rows.append(("T-score Pearson r", *_fmt(ts["pearson_r"])))
        rows.append(("ROC-AUC of predicted T, T <= -2.5", *_fmt(ts["roc_auc"]["osteoporosis"])))
        rows.append(("ROC-AUC of predicted T, T < -1", *_fmt(ts["roc_auc"]["low_bone_mass"])))
    auc = metrics.get("roc_auc", {})
    if "macro" in auc:
        rows.append(("ROC-AUC macro (one-vs-rest)", *_fmt(auc["macro"])))
    for cls, cell in auc.get("per_class", {}).items():
        rows.append((f"ROC-AUC {cls} vs rest", *_fmt(cell)))
    return rows
