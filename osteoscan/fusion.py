"""Covariate fusion: a multinomial logistic stacker over the image ensemble and age / sex.

Fitted with scikit-learn, stored as plain JSON in the model manifest (``manifest.fusion``) and
applied with NumPy, so loading a model never unpickles anything.

Features
--------
- image: ``log(clip(p_c, 1e-6, 1))`` for each class ``c`` of the *calibrated* ensemble
  probabilities (C features). Log-probabilities make the stacker a reweighting of the ensemble's
  own log-odds, so a model that learns "trust the image" needs only coefficients near the identity.
- ``age_z``: ``(age - age_mean) / age_std`` with the mean / std of the training rows that had an
  age (stored, so scan-time standardisation matches training).
- ``sex_f``: 1.0 for ``F``, 0.0 for ``M``; anything else counts as missing.

Models
------
One model per covariate subset, each fitted on the rows that carry that subset: ``"age,sex"``
(image + age + sex), ``"age"`` (image + age), ``"sex"`` (image + sex). :func:`apply_fusion` uses
the richest subset a row has (``age,sex`` > ``age`` > ``sex``); a row with neither keeps the
image-only probabilities unchanged and reports ``used=""``. ``"covariates_only:<subset>"`` models
(no image features) exist so evaluation can show what the image adds over age and sex alone
(:func:`apply_covariates_only`). A subset with too few rows, or fewer than two classes among them,
is simply absent.

JSON format (``FUSION_FORMAT = "osteoscan-fusion/1"``)
-----------------------------------------------------
::

    {
      "format": "osteoscan-fusion/1",
      "classes": ["normal", "osteopenia", "osteoporosis"],
      "prob_clip": 1e-6,
      "age_mean": 58.1, "age_std": 12.4,          # over training rows with an age
      "C": 1.0, "class_weight": null,              # fitting settings, for the record
      "models": {
        "age,sex": {
          "features": ["log_p_normal", "log_p_osteopenia", "log_p_osteoporosis", "age_z", "sex_f"],
          "coef": [[...F floats...], ...C rows...],   # one row per class, in "classes" order
          "intercept": [...C floats...],
          "n": 412                                     # training rows it was fitted on
        },
        "age": {...}, "sex": {...},
        "covariates_only:age,sex": {"features": ["age_z", "sex_f"], ...},
        "covariates_only:age": {...}, "covariates_only:sex": {...}
      }
    }

``probs = softmax(X @ coef.T + intercept)`` row-wise, with ``X`` the features in ``features``
order. Binary problems are stored in the same C-row form (scikit-learn's single sigmoid row
becomes ``[0, w]``, which gives identical probabilities). A class absent from a subset's training
rows gets a zero coefficient row and intercept ``-50`` (probability ~0), keeping the output C wide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

FUSION_FORMAT = "osteoscan-fusion/1"
PROB_CLIP = 1e-6
SUBSETS: tuple[str, ...] = ("age,sex", "age", "sex")  # richest first: apply_fusion's order
COVARIATES_ONLY = "covariates_only:"
ABSENT_CLASS_INTERCEPT = -50.0
MIN_ROWS = 10  # fewer rows than this: the subset is not fitted (too little to learn from)


def encode_sex(sexes: Sequence[str | None]) -> np.ndarray:
    """``F`` → 1.0, ``M`` → 0.0, anything else (None, "O", "") → NaN (missing)."""
    out = np.full(len(sexes), np.nan, dtype=np.float64)
    for i, s in enumerate(sexes):
        if isinstance(s, str):
            s = s.strip().upper()
            if s in ("F", "M"):
                out[i] = 1.0 if s == "F" else 0.0
    return out


def _as_ages(ages: Sequence[float | None] | np.ndarray, n: int) -> np.ndarray:
    arr = np.array([np.nan if a is None else a for a in ages], dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"expected {n} ages, got shape {arr.shape}")
    arr[~np.isfinite(arr)] = np.nan
    return arr


def _image_features(img_probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(img_probs, dtype=np.float64), PROB_CLIP, 1.0))


def _design(
    subset: str, img_feat: np.ndarray | None, age_z: np.ndarray, sex_f: np.ndarray
) -> np.ndarray:
    cols: list[np.ndarray] = [] if img_feat is None else [img_feat]
    parts = subset.split(",")
    if "age" in parts:
        cols.append(age_z[:, None])
    if "sex" in parts:
        cols.append(sex_f[:, None])
    return np.concatenate(cols, axis=1)


def _has(subset: str, age_z: np.ndarray, sex_f: np.ndarray) -> np.ndarray:
    mask = np.ones(len(age_z), dtype=bool)
    for part in subset.split(","):
        mask &= ~np.isnan(age_z if part == "age" else sex_f)
    return mask


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_one(
    X: np.ndarray, y: np.ndarray, n_classes: int, C: float, class_weight: str | None
) -> dict[str, Any] | None:
    from sklearn.linear_model import LogisticRegression  # heavy import: only when fitting

    present = np.unique(y)
    if len(y) < MIN_ROWS or len(present) < 2:
        return None
    lr = LogisticRegression(C=C, class_weight=class_weight, max_iter=2000)
    lr.fit(X, y)
    coef = np.zeros((n_classes, X.shape[1]))
    intercept = np.full(n_classes, ABSENT_CLASS_INTERCEPT)
    if len(lr.classes_) == 2:
        # sklearn's binary model is sigmoid(w.x + b) for classes_[1]; softmax over [0, w.x + b]
        # is the same function.
        coef[lr.classes_[0]] = 0.0
        intercept[lr.classes_[0]] = 0.0
        coef[lr.classes_[1]] = lr.coef_[0]
        intercept[lr.classes_[1]] = lr.intercept_[0]
    else:
        coef[lr.classes_] = lr.coef_
        intercept[lr.classes_] = lr.intercept_
    return {"coef": coef.tolist(), "intercept": intercept.tolist(), "n": int(len(y))}


def fit_fusion(
    img_probs: np.ndarray,
    ages: Sequence[float | None] | np.ndarray,
    sexes: Sequence[str | None],
    y: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    *,
    C: float = 1.0,
    class_weight: str | None = None,
) -> dict[str, Any]:
    """Fit the stacker on (ideally out-of-fold) calibrated ensemble probabilities.

    ``img_probs`` (N, C) calibrated image-ensemble probabilities; ``ages`` (N,) years, NaN/None
    when missing; ``sexes`` (N,) ``"F"``/``"M"``/None; ``y`` (N,) class indices into ``classes``.
    ``C`` is scikit-learn's inverse L2 strength (1.0 suits a few hundred rows);
    ``class_weight="balanced"`` reweights rare classes. Returns the JSON-able dict described in
    the module docstring. Raises ``ValueError`` when no row has a covariate.
    """
    img_probs = np.asarray(img_probs, dtype=np.float64)
    n, n_classes = img_probs.shape
    if n_classes != len(classes):
        raise ValueError(f"img_probs has {n_classes} columns but there are {len(classes)} classes")
    y = np.asarray(y, dtype=np.int64)
    if y.shape != (n,) or len(sexes) != n:
        raise ValueError("img_probs, ages, sexes and y must have the same length")
    age = _as_ages(ages, n)
    sex_f = encode_sex(sexes)
    has_age = ~np.isnan(age)
    if not has_age.any() and np.isnan(sex_f).all():
        raise ValueError("no training row has an age or a sex: nothing to fuse")
    age_mean = float(age[has_age].mean()) if has_age.any() else 0.0
    age_std = float(age[has_age].std()) if has_age.sum() > 1 else 1.0
    age_std = age_std if age_std > 1e-6 else 1.0
    age_z = (age - age_mean) / age_std
    img_feat = _image_features(img_probs)
    img_names = [f"log_p_{c}" for c in classes]

    models: dict[str, Any] = {}
    for subset in SUBSETS:
        rows = _has(subset, age_z, sex_f)
        cov_names = [{"age": "age_z", "sex": "sex_f"}[p] for p in subset.split(",")]
        for key, feat, names in (
            (subset, img_feat, img_names + cov_names),
            (COVARIATES_ONLY + subset, None, cov_names),
        ):
            X = _design(subset, None if feat is None else feat[rows], age_z[rows], sex_f[rows])
            fitted = _fit_one(X, y[rows], n_classes, C, class_weight)
            if fitted is not None:
                models[key] = {"features": names, **fitted}
    return {
        "format": FUSION_FORMAT,
        "classes": list(classes),
        "prob_clip": PROB_CLIP,
        "age_mean": age_mean,
        "age_std": age_std,
        "C": float(C),
        "class_weight": class_weight,
        "models": models,
    }


def validate_fusion(fusion: dict[str, Any], n_classes: int | None = None) -> None:
    """Raise ``ValueError`` when a stored fusion dict is malformed (checked at package load)."""
    if fusion.get("format") != FUSION_FORMAT:
        raise ValueError(f"unknown fusion format {fusion.get('format')!r}")
    classes = fusion.get("classes") or []
    if n_classes is not None and len(classes) != n_classes:
        raise ValueError(f"fusion has {len(classes)} classes, the model {n_classes}")
    for key, m in fusion.get("models", {}).items():
        coef = np.asarray(m["coef"], dtype=np.float64)
        icpt = np.asarray(m["intercept"], dtype=np.float64)
        if coef.shape != (len(classes), len(m["features"])) or icpt.shape != (len(classes),):
            raise ValueError(f"fusion model {key!r} has inconsistent shapes")
        if not (np.isfinite(coef).all() and np.isfinite(icpt).all()):
            raise ValueError(f"fusion model {key!r} has non-finite coefficients")
    for key in ("age_mean", "age_std"):
        if not math.isfinite(float(fusion[key])):
            raise ValueError(f"fusion {key} is not finite")


def _encode(
    fusion: dict[str, Any], ages: Sequence[float | None] | np.ndarray, sexes: Sequence[str | None]
) -> tuple[np.ndarray, np.ndarray]:
    n = len(sexes)
    age_z = (_as_ages(ages, n) - float(fusion["age_mean"])) / float(fusion["age_std"])
    return age_z, encode_sex(sexes)


def _predict(model: dict[str, Any], X: np.ndarray) -> np.ndarray:
    coef = np.asarray(model["coef"], dtype=np.float64)
    icpt = np.asarray(model["intercept"], dtype=np.float64)
    return _softmax(X @ coef.T + icpt)


def apply_fusion(
    fusion: dict[str, Any] | None,
    img_probs: np.ndarray,
    ages: Sequence[float | None] | np.ndarray,
    sexes: Sequence[str | None],
) -> tuple[np.ndarray, list[str]]:
    """Fuse image probabilities with whatever covariates each row has.

    Returns ``(probs (N, C) float32, used)`` where ``used[i]`` is ``"age,sex"``, ``"age"``,
    ``"sex"`` or ``""`` (image only: that row's probabilities are returned unchanged). With
    ``fusion=None`` every row is image-only.
    """
    img = np.asarray(img_probs, dtype=np.float32)
    out = img.copy()
    used = [""] * len(img)
    if fusion is None or len(img) == 0:
        return out, used
    age_z, sex_f = _encode(fusion, ages, sexes)
    img_feat = _image_features(img)
    done = np.zeros(len(img), dtype=bool)
    for subset in SUBSETS:
        model = fusion["models"].get(subset)
        if model is None:
            continue
        rows = _has(subset, age_z, sex_f) & ~done
        if not rows.any():
            continue
        X = _design(subset, img_feat[rows], age_z[rows], sex_f[rows])
        out[rows] = _predict(model, X).astype(np.float32)
        done |= rows
        for i in np.flatnonzero(rows):
            used[i] = subset
    return out, used


def apply_covariates_only(
    fusion: dict[str, Any], ages: Sequence[float | None] | np.ndarray, sexes: Sequence[str | None]
) -> tuple[np.ndarray, list[str]]:
    """Probabilities from age / sex alone (for evaluation: what does the image add?).

    Returns ``(probs (N, C) float32, used)``; rows without any covariate (or without a fitted
    covariates-only model for what they have) are NaN with ``used=""``.
    """
    n = len(sexes)
    out = np.full((n, len(fusion["classes"])), np.nan, dtype=np.float32)
    used = [""] * n
    age_z, sex_f = _encode(fusion, ages, sexes)
    done = np.zeros(n, dtype=bool)
    for subset in SUBSETS:
        model = fusion["models"].get(COVARIATES_ONLY + subset)
        if model is None:
            continue
        rows = _has(subset, age_z, sex_f) & ~done
        if rows.any():
            out[rows] = _predict(model, _design(subset, None, age_z[rows], sex_f[rows]))
            done |= rows
            for i in np.flatnonzero(rows):
                used[i] = subset
    return out, used
