"""Tests for the covariate fusion stacker (fit with sklearn, stored as JSON, applied with NumPy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from osteoscan.fusion import (
    FUSION_FORMAT,
    apply_covariates_only,
    apply_fusion,
    encode_sex,
    fit_fusion,
    validate_fusion,
)

CLASSES3 = ["normal", "osteopenia", "osteoporosis"]


def _synthetic(
    n: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """Age strongly predictive, sex mildly, the image weakly (noisy probabilities)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(30, 90, n)
    sex = rng.choice(["F", "M"], n)
    risk = (age - 60) / 10 + 0.7 * (sex == "F") + rng.normal(0, 0.8, n)
    edges = np.quantile(risk, np.linspace(0, 1, n_classes + 1)[1:-1])
    y = np.digitize(risk, edges)
    logits = rng.normal(0, 1.0, (n, n_classes))
    logits[np.arange(n), y] += 0.8  # weak image signal
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs.astype(np.float32), age, list(sex), y


def test_encode_sex() -> None:
    out = encode_sex(["F", "m", None, "O", " f "])
    assert out[0] == 1.0 and out[1] == 0.0 and out[4] == 1.0
    assert np.isnan(out[2]) and np.isnan(out[3])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fusion_improves_log_loss_when_age_is_predictive(n_classes: int) -> None:
    classes = CLASSES3[-n_classes:] if n_classes == 2 else CLASSES3
    p_tr, a_tr, s_tr, y_tr = _synthetic(600, n_classes, seed=0)
    p_te, a_te, s_te, y_te = _synthetic(400, n_classes, seed=1)
    fusion = fit_fusion(p_tr, a_tr, s_tr, y_tr, classes)
    fused, used = apply_fusion(fusion, p_te, a_te, s_te)
    assert used == ["age,sex"] * len(y_te)
    np.testing.assert_allclose(fused.sum(1), 1.0, atol=1e-5)
    labels = list(range(n_classes))
    img_loss = log_loss(y_te, p_te, labels=labels)
    fused_loss = log_loss(y_te, fused, labels=labels)
    assert fused_loss < img_loss - 0.1, (img_loss, fused_loss)
    cov_only, used_cov = apply_covariates_only(fusion, a_te, s_te)
    assert used_cov == ["age,sex"] * len(y_te)
    cov_loss = log_loss(y_te, cov_only, labels=labels)
    # the image adds something on top of the covariates in this synthetic set
    assert fused_loss < cov_loss < img_loss


@pytest.mark.parametrize("n_classes", [2, 3])
def test_apply_reproduces_sklearn_predict_proba(n_classes: int) -> None:
    classes = CLASSES3[:n_classes]
    probs, age, sex, y = _synthetic(300, n_classes, seed=2)
    fusion = fit_fusion(probs, age, sex, y, classes, class_weight="balanced")
    # the same design, fitted by sklearn directly
    age_z = (age - age.mean()) / age.std()
    sex_f = (np.asarray(sex) == "F").astype(float)
    X = np.column_stack([np.log(np.clip(probs.astype(np.float64), 1e-6, 1)), age_z, sex_f])
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(X, y)
    ours, _ = apply_fusion(fusion, probs, age, sex)
    np.testing.assert_allclose(ours, ref.predict_proba(X), atol=1e-4)
    # covariates-only likewise
    ref_cov = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    ref_cov.fit(np.column_stack([age_z, sex_f]), y)
    cov, _ = apply_covariates_only(fusion, age, sex)
    np.testing.assert_allclose(
        cov, ref_cov.predict_proba(np.column_stack([age_z, sex_f])), atol=1e-4
    )


def test_json_round_trip_and_format() -> None:
    probs, age, sex, y = _synthetic(200, 3, seed=3)
    fusion = fit_fusion(probs, age, sex, y, CLASSES3)
    text = json.dumps(fusion, allow_nan=False)  # strict JSON: no NaN / Infinity
    loaded = json.loads(text)
    validate_fusion(loaded, n_classes=3)
    assert loaded["format"] == FUSION_FORMAT
    assert set(loaded["models"]) == {
        "age,sex",
        "age",
        "sex",
        "covariates_only:age,sex",
        "covariates_only:age",
        "covariates_only:sex",
    }
    assert loaded["models"]["age,sex"]["features"][-2:] == ["age_z", "sex_f"]
    a, _ = apply_fusion(fusion, probs, age, sex)
    b, _ = apply_fusion(loaded, probs, age, sex)
    np.testing.assert_array_equal(a, b)


def test_richest_subset_per_row_and_image_only_fallback() -> None:
    probs, age, sex, y = _synthetic(300, 3, seed=4)
    fusion = fit_fusion(probs, age, sex, y, CLASSES3)
    p = probs[:4]
    fused, used = apply_fusion(fusion, p, [70.0, 70.0, None, float("nan")], ["F", None, "F", None])
    assert used == ["age,sex", "age", "sex", ""]
    np.testing.assert_array_equal(fused[3], p[3])  # image-only row untouched
    assert not np.allclose(fused[1], p[1])
    # no fusion at all → unchanged, used ""
    same, used0 = apply_fusion(None, p, [70.0] * 4, ["F"] * 4)
    np.testing.assert_array_equal(same, p)
    assert used0 == [""] * 4


def test_missing_subset_is_skipped_and_falls_back() -> None:
    # only age present in training → no "sex"/"age,sex" models; sex-only rows stay image-only
    probs, age, _sex, y = _synthetic(200, 3, seed=5)
    fusion = fit_fusion(probs, age, [None] * 200, y, CLASSES3)
    assert set(fusion["models"]) == {"age", "covariates_only:age"}
    fused, used = apply_fusion(fusion, probs[:2], [60.0, None], ["F", "F"])
    assert used == ["age", ""]
    np.testing.assert_array_equal(fused[1], probs[1])


def test_class_absent_from_training_rows_keeps_width() -> None:
    probs, age, sex, y = _synthetic(200, 3, seed=6)
    y = np.where(y == 1, 0, y)  # no osteopenia in training labels
    fusion = fit_fusion(probs, age, sex, y, CLASSES3)
    fused, _ = apply_fusion(fusion, probs, age, sex)
    assert fused.shape == (200, 3)
    assert fused[:, 1].max() < 1e-12 + 1e-6
    np.testing.assert_allclose(fused.sum(1), 1.0, atol=1e-5)


def test_errors() -> None:
    probs, age, sex, y = _synthetic(50, 3, seed=7)
    with pytest.raises(ValueError, match="nothing to fuse"):
        fit_fusion(probs, [None] * 50, [None] * 50, y, CLASSES3)
    with pytest.raises(ValueError, match="classes"):
        fit_fusion(probs, age, sex, y, CLASSES3[:2])
    bad = fit_fusion(probs, age, sex, y, CLASSES3)
    bad["models"]["age"]["coef"] = [[0.0]]
    with pytest.raises(ValueError, match="inconsistent"):
        validate_fusion(bad)
