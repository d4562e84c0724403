"""Tests for classification metrics against hand-computed values, and their bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from osteoscan.metrics import classification_metrics, format_metrics_table

CLASSES = ["normal", "osteopenia", "osteoporosis"]
Y = [0, 0, 1, 1, 2, 2]
P = np.array(
    [
        [0.7, 0.2, 0.1],  # normal, right
        [0.2, 0.5, 0.3],  # normal, predicted osteopenia
        [0.1, 0.8, 0.1],  # osteopenia, right
        [0.1, 0.3, 0.6],  # osteopenia, predicted osteoporosis, flagged (false positive)
        [0.1, 0.2, 0.7],  # osteoporosis, right, flagged (true positive)
        [0.3, 0.3, 0.4],  # osteoporosis, right by argmax, not flagged (false negative)
    ]
)


def test_hand_computed_values() -> None:
    m = classification_metrics(Y, P, CLASSES, ["osteoporosis"], 0.5, n_boot=0)
    # screening at 0.5: TP 1, FP 1, FN 1, TN 3
    assert m["screening"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 3}
    assert m["sensitivity"]["value"] == pytest.approx(1 / 2)
    assert m["specificity"]["value"] == pytest.approx(3 / 4)
    assert m["precision"]["value"] == pytest.approx(1 / 2)
    assert m["npv"]["value"] == pytest.approx(3 / 4)
    assert m["f1"]["value"] == pytest.approx(1 / 2)
    assert m["screening_accuracy"]["value"] == pytest.approx(4 / 6)
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)  # argmax
    assert m["balanced_accuracy"]["value"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    # positive scores {0.7, 0.4} vs negatives {0.1, 0.3, 0.1, 0.6}: 7 of 8 pairs ordered
    assert m["roc_auc"]["value"] == pytest.approx(7 / 8)
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["confusion_matrix"]["classes"] == CLASSES
    op = m["per_class"]["osteoporosis"]
    assert op["sensitivity"]["value"] == pytest.approx(1.0)
    assert op["precision"]["value"] == pytest.approx(2 / 3)
    assert op["specificity"]["value"] == pytest.approx(3 / 4)
    assert op["f1"]["value"] == pytest.approx(0.8)
    assert m["n"] == 6 and m["n_per_class"] == {"normal": 2, "osteopenia": 2, "osteoporosis": 2}
    assert m["accuracy"]["ci95"] == [None, None]  # no bootstrap asked


def test_auc_matches_sklearn_with_ties_and_string_labels() -> None:
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 3, n)
    logits = np.round(rng.normal(size=(n, 3)) + np.eye(3)[y], 1)  # rounding makes ties
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [CLASSES[i] for i in y]
    m = classification_metrics(names, p, CLASSES, ["osteopenia", "osteoporosis"], 0.6, n_boot=0)
    assert m["roc_auc"]["value"] == pytest.approx(roc_auc_score(y >= 1, p[:, 1:].sum(1)))
    for i, c in enumerate(CLASSES):
        assert m["roc_auc"]["per_class"][c]["value"] == pytest.approx(
            roc_auc_score(y == i, p[:, i])
        )
    macro = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["roc_auc"]["macro"]["value"] == pytest.approx(macro)


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_intervals_contain_value_and_are_deterministic(stratified: bool) -> None:
    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 3, n)
    p = rng.dirichlet(np.ones(3), n) * 0.75 + np.eye(3)[y] * 0.25
    kw = dict(n_boot=300, seed=5, stratified=stratified)
    m = classification_metrics(y, p, CLASSES, ["osteoporosis"], 0.4, **kw)
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi, key
        assert hi - lo > 0, key
    lo, hi = m["roc_auc"]["per_class"]["normal"]["ci95"]
    assert lo <= m["roc_auc"]["per_class"]["normal"]["value"] <= hi
    again = classification_metrics(y, p, CLASSES, ["osteoporosis"], 0.4, **kw)
    assert again == m
    json.dumps(m)  # plain JSON


def test_degenerate_single_class_gives_none_not_crash() -> None:
    y = [0, 0, 0, 0]
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    m = classification_metrics(y, p, ["normal", "osteoporosis"], ["osteoporosis"], 0.5, n_boot=50)
    assert m["roc_auc"]["value"] is None and m["roc_auc"]["ci95"] == [None, None]
    assert m["sensitivity"]["value"] is None
    assert m["specificity"]["value"] == pytest.approx(3 / 4)
    lo, hi = m["specificity"]["ci95"]
    assert lo <= 0.75 <= hi
    json.dumps(m)


def test_unstratified_bootstrap_skips_one_class_resamples() -> None:
    # 1 positive in 10: many plain resamples miss it, AUC must still get an interval from the rest.
    y = [0] * 9 + [1]
    p = np.array([[1 - s, s] for s in np.linspace(0.05, 0.5, 10)])
    m = classification_metrics(
        y, p, ["normal", "osteoporosis"], ["osteoporosis"], 0.45, n_boot=400, stratified=False
    )
    assert m["roc_auc"]["value"] == pytest.approx(1.0)
    assert m["roc_auc"]["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="positive"):
        classification_metrics(Y, P, CLASSES, ["fracture"], 0.5, n_boot=0)
    with pytest.raises(ValueError, match="probs"):
        classification_metrics(Y, P[:, :2], CLASSES, ["osteoporosis"], 0.5, n_boot=0)
    with pytest.raises(ValueError, match="not one of"):
        classification_metrics(["cat"] * 6, P, CLASSES, ["osteoporosis"], 0.5, n_boot=0)


def test_format_table_rows() -> None:
    m = classification_metrics(Y, P, CLASSES, ["osteoporosis"], 0.5, n_boot=100)
    rows = format_metrics_table(m)
    assert rows[0] == ("n (images)", "6", "")
    labels = [r[0] for r in rows]
    assert "accuracy (argmax)" in labels
    assert any(lab.startswith("sensitivity (osteoporosis vs rest @ 0.500") for lab in labels)
    assert "ROC-AUC osteopenia vs rest" in labels
    auc_row = next(r for r in rows if r[0] == "ROC-AUC (osteoporosis vs rest)")
    assert auc_row[1] == "0.875" and "–" in auc_row[2]
    assert all(len(r) == 3 and all(isinstance(x, str) for x in r) for r in rows)
