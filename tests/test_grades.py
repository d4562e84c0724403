"""Grade cut-offs on the expected grade: exact fit, honest cross-fitting, metrics that use them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from osteoscan.grades import (
    cross_fitted_predictions,
    expected_grade,
    fit_grade_cutoffs,
    grade_cutoffs_of,
    predict_classes,
)
from osteoscan.metrics import classification_metrics, format_metrics_table


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    p = rng.dirichlet(np.ones(k), size=n)
    return p / p.sum(axis=1, keepdims=True)


def test_without_cutoffs_the_rule_is_argmax() -> None:
    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.1, 0.4]])
    assert predict_classes(p).tolist() == [1, 0]
    # Expected grades 1.2 and 0.9: through cut-offs (0.5, 1.5) both are grade 1.
    assert expected_grade(p) == pytest.approx([1.2, 0.9])
    assert predict_classes(p, [0.5, 1.5]).tolist() == [1, 1]
    with pytest.raises(ValueError, match="cut-offs"):
        predict_classes(p, [0.5])


def test_fitted_cutoffs_reach_the_best_accuracy_of_any_cutoff_rule() -> None:
    rng = np.random.default_rng(3)
    for trial in range(6):
        k = 3 + trial % 2
        p = _probs(rng, 40, k)
        y = rng.integers(0, k, 40)
        cuts = fit_grade_cutoffs(p, y)
        assert len(cuts) == k - 1 and all(a <= b for a, b in itertools.pairwise(cuts))
        got = np.mean(predict_classes(p, cuts) == y)
        # Brute force over every monotone placement of cut-offs between sorted expected grades.
        e = np.sort(expected_grade(p))
        cands = np.r_[e[0] - 1, (e[1:] + e[:-1]) / 2, e[-1] + 1]
        best = max(
            np.mean(predict_classes(p, list(c)) == y)
            for c in itertools.combinations_with_replacement(cands, k - 1)
        )
        assert got == pytest.approx(best)


def test_cutoffs_recover_a_shifted_scale() -> None:
    # A model whose probabilities put every image one grade too low: argmax is always wrong,
    # fitted cut-offs read the same probabilities correctly.
    y = np.repeat(np.arange(1, 5), 25)
    p = np.full((len(y), 5), 0.02)
    p[np.arange(len(y)), y - 1] = 0.92
    assert np.mean(predict_classes(p) == y) == 0.0
    assert np.mean(predict_classes(p, fit_grade_cutoffs(p, y)) == y) == 1.0


def test_cross_fitted_grades_never_use_cutoffs_fitted_on_their_own_fold() -> None:
    # Fold 1's labels sit one grade above fold 0's: cut-offs fitted on fold 0 get most of fold 1
    # wrong, while cut-offs fitted on fold 1 itself would get all of it right.
    e_grade = np.tile(np.arange(3), 20)
    p = np.eye(3)[e_grade] * 0.9 + 0.1 / 3
    fold = np.repeat([0, 1], 30)
    y = np.where(fold == 0, e_grade, np.minimum(e_grade + 1, 2))
    pred = cross_fitted_predictions(p, y, fold)
    inside = fold == 1
    assert np.mean(pred[inside] == y[inside]) < np.mean(
        predict_classes(p[inside], fit_grade_cutoffs(p[inside], y[inside])) == y[inside]
    )
    assert np.array_equal(
        pred[inside], predict_classes(p[inside], fit_grade_cutoffs(p[~inside], y[~inside]))
    )


def test_metrics_use_the_predicted_grades_and_say_so() -> None:
    y = np.repeat(np.arange(1, 5), 10)
    p = np.full((len(y), 5), 0.02)
    p[np.arange(len(y)), y - 1] = 0.92
    pred = predict_classes(p, fit_grade_cutoffs(p, y))
    classes = list("01234")
    m = classification_metrics(
        y, p, classes, ["2", "3", "4"], 0.5, n_boot=0, ordinal=True, pred=pred
    )
    plain = classification_metrics(y, p, classes, ["2", "3", "4"], 0.5, n_boot=0, ordinal=True)
    assert m["accuracy"]["value"] == 1.0 and plain["accuracy"]["value"] == 0.0
    assert m["mae"]["value"] == 0.0 and plain["mae"]["value"] == 1.0
    assert np.trace(np.array(m["confusion_matrix"]["matrix"])) == len(y)
    assert m["prediction_rule"] == "grade_cutoffs" and plain["prediction_rule"] == "argmax"
    labels = [row[0] for row in format_metrics_table(m)]
    assert "accuracy (grade cut-offs)" in labels
    with pytest.raises(ValueError, match="length"):
        classification_metrics(y, p, classes, ["4"], 0.5, n_boot=0, pred=pred[:-1])


def test_manifest_target_cutoffs() -> None:
    assert grade_cutoffs_of(None) is None
    assert grade_cutoffs_of({"kind": "ordinal"}) is None
    assert grade_cutoffs_of({"kind": "tscore", "grade_cutoffs": [1.0]}) is None
    assert grade_cutoffs_of({"kind": "ordinal", "grade_cutoffs": [0.5, 1]}) == [0.5, 1.0]
