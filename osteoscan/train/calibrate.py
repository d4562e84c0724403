"""Probability calibration (temperature scaling) and the screening operating point.

- :func:`fit_temperature`: one temperature ``T`` per ensemble member, minimising the negative
  log-likelihood of ``softmax(logits / T)`` on held-out (validation) logits. A coarse log-spaced
  grid followed by golden-section refinement: deterministic, needs no gradients and cannot diverge
  on the tiny, sometimes perfectly separated validation sets of small medical data.
- :func:`screening_threshold`: the highest threshold on the positive-class score that still
  reaches ``target_sensitivity`` on held-out data, so the stored operating point errs on the side
  of referring a case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "softmax",
    "nll",
    "fit_temperature",
    "positive_score",
    "screening_threshold",
    "sensitivity_specificity",
]

T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes ``y`` under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    zmax = z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    y = np.asarray(y, dtype=np.int64)
    return float(np.mean(logz - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: Sequence[int] | np.ndarray, n_grid: int = 60) -> float:
    """Temperature in [0.05, 20] minimising validation NLL; 1.0 when there is nothing to fit.

    The search runs over ``log T`` (the NLL is smooth and unimodal in practice there): a grid of
    ``n_grid`` points, then golden-section search in the bracket around the best grid point.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if logits.ndim != 2 or len(y) != logits.shape[0] or len(y) < 2:
        return 1.0
    grid = np.linspace(math.log(T_MIN), math.log(T_MAX), n_grid)
    losses = [nll(logits, y, math.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, y, math.exp(c)), nll(logits, y, math.exp(d))
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, y, math.exp(d))
    best = math.exp((a + b) / 2.0)
    # Guard: never return something worse than the best grid point or than no scaling at all.
    candidates = [(nll(logits, y, best), best), (losses[i], math.exp(grid[i]))]
    candidates.append((nll(logits, y, 1.0), 1.0))
    return float(min(candidates)[1])


def positive_score(probs: np.ndarray, positive_idx: Sequence[int]) -> np.ndarray:
    """Screening score: summed probability of the positive classes, shape (N,)."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs[:, list(positive_idx)].sum(axis=1)


def screening_threshold(
    scores: np.ndarray, is_positive: np.ndarray, target_sensitivity: float = 0.9
) -> float:
    """Highest threshold ``t`` with sensitivity(``score >= t``) >= ``target_sensitivity``.

    Chosen on held-out scores. With no positive cases there is no evidence to choose from, so the
    neutral 0.5 is returned (the caller records that in the manifest's metrics).
    """
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.sort(scores[np.asarray(is_positive, dtype=bool)])[::-1]
    if pos.size == 0:
        return 0.5
    k = max(1, math.ceil(float(target_sensitivity) * pos.size - 1e-9))
    return float(pos[min(k, pos.size) - 1])


def sensitivity_specificity(
    scores: np.ndarray, is_positive: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(sensitivity, specificity) of ``score >= threshold``; NaN where a side has no cases."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(is_positive, dtype=bool)
    flagged = scores >= threshold
    sens = float(flagged[pos].mean()) if pos.any() else float("nan")
    spec = float((~flagged[~pos]).mean()) if (~pos).any() else float("nan")
    return sens, spec
