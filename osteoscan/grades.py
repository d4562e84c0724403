"""Which grade to report for an ordinal model: cut-offs on the expected grade.

The most probable class (argmax) is the right answer for unordered classes, but a poor one for
ordered grades predicted by a model that is unsure between neighbours. An adjacent-category
model that cannot tell grade 1 from grades 0 and 2 spreads its probability over them, and the
argmax then jumps from 0 straight to a far grade: on the knee-kl benchmark (5 KL grades) argmax
never predicted grade 1, predicted grade 4 four times as often as it occurs, and reached a
five-grade accuracy of 0.49, while the same probabilities read through cut-offs reached 0.58-0.59
on data the cut-offs were not fitted on.

The rule here: the *expected grade* ``E = sum_k k p_k`` is one number per image on the grades'
own scale, and the reported grade is the number of cut-offs ``c_1 <= ... <= c_(K-1)`` that ``E``
reaches. The cut-offs are fitted on the validation part (never on the rows reported on) to
maximise accuracy, exactly, by dynamic programming over the images sorted by ``E``: the best
monotone assignment of grades to sorted images, with each cut-off half way between the last image
of one grade and the first of the next. A grade that no fitted assignment uses gets a zero-width
interval (two equal cut-offs). Without cut-offs (plain classes, older packages) the rule is argmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "expected_grade",
    "predict_classes",
    "fit_grade_cutoffs",
    "cross_fitted_predictions",
    "grade_cutoffs_of",
]


def grade_cutoffs_of(target: Mapping[str, Any] | None) -> list[float] | None:
    """The grade cut-offs a package's manifest ``target`` carries (None: argmax)."""
    cuts = (target or {}).get("grade_cutoffs") if (target or {}).get("kind") == "ordinal" else None
    return [float(c) for c in cuts] if isinstance(cuts, list) and cuts else None


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """``sum_k k p_k`` for each row of (N, K) probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    return p @ np.arange(p.shape[1], dtype=np.float64)


def predict_classes(probs: np.ndarray, cutoffs: Sequence[float] | None = None) -> np.ndarray:
    """Class index per row: argmax without ``cutoffs``, else cut-offs on the expected grade."""
    p = np.asarray(probs, dtype=np.float64)
    if cutoffs is None or len(p) == 0:
        return p.argmax(axis=1) if p.size else np.zeros(len(p), dtype=np.int64)
    cuts = np.asarray(cutoffs, dtype=np.float64)
    if len(cuts) != p.shape[1] - 1:
        raise ValueError(f"{len(cuts)} grade cut-offs for {p.shape[1]} classes")
    return np.searchsorted(cuts, expected_grade(p), side="right").astype(np.int64)


def fit_grade_cutoffs(probs: np.ndarray, y: np.ndarray) -> list[float]:
    """Cut-offs on the expected grade that maximise accuracy on (``probs``, ``y``).

    Exact: with images sorted by expected grade, a cut-off rule is a non-decreasing assignment of
    grades, and the best one is found by dynamic programming in O(N K). Ties in expected grade
    are kept together (one cut-off cannot separate equal values). Returns K - 1 floats.
    """
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    e = expected_grade(p)
    if len(e) == 0:
        return [g + 0.5 for g in range(k - 1)]
    order = np.argsort(e, kind="stable")
    e_sorted, y_sorted = e[order], np.asarray(y, dtype=np.int64)[order]
    # Runs of equal expected grade: one decision each, scored by how many of each grade it holds.
    starts = np.flatnonzero(np.r_[True, np.diff(e_sorted) > 0])
    counts = np.zeros((len(starts), k))
    run_of = np.cumsum(np.r_[True, np.diff(e_sorted) > 0]) - 1
    np.add.at(counts, (run_of, y_sorted), 1.0)
    best = np.zeros(k)  # best[g]: most correct so far with the last run graded <= g
    choice = np.zeros((len(starts), k), dtype=np.int64)
    for i in range(len(starts)):
        gain = best + counts[i]  # run i graded g after runs graded <= g
        prefix = np.maximum.accumulate(gain)
        choice[i] = [int(np.argmax(gain[: g + 1])) for g in range(k)]
        best = prefix
    grades = np.zeros(len(starts), dtype=np.int64)
    g = k - 1
    for i in range(len(starts) - 1, -1, -1):
        g = int(choice[i, g])
        grades[i] = g
    run_values = e_sorted[starts]
    cuts: list[float] = []
    for c in range(1, k):
        above = np.flatnonzero(grades >= c)
        below = np.flatnonzero(grades < c)
        if len(above) == 0:
            cuts.append(float(run_values[-1]) + 0.5)
        elif len(below) == 0:
            cuts.append(float(run_values[0]) - 0.5)
        else:
            lo, hi = run_values[below[-1]], run_values[above[0]]
            cuts.append(float((lo + hi) / 2.0))
    return list(np.maximum.accumulate(np.array(cuts)).tolist())


def cross_fitted_predictions(probs: np.ndarray, y: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Grades of each fold's rows from cut-offs fitted on the other folds' rows (honest K-fold)."""
    p, yy, folds = np.asarray(probs), np.asarray(y), np.asarray(fold_of)
    pred = predict_classes(p)
    for f in np.unique(folds):
        inside = folds == f
        if (~inside).any():
            pred[inside] = predict_classes(p[inside], fit_grade_cutoffs(p[~inside], yy[~inside]))
    return pred
