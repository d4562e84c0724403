"""Tests for osteoscan.train.calibrate: temperature scaling and the screening threshold."""

from __future__ import annotations

import numpy as np
import pytest

from osteoscan.train.calibrate import (
    fit_temperature,
    nll,
    positive_score,
    screening_threshold,
    sensitivity_specificity,
    softmax,
)


def _overconfident(n: int = 400, true_t: float = 3.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 3)) * 1.5
    p = softmax(base)
    y = np.array([rng.choice(3, p=row) for row in p])
    return base * true_t, y  # logits whose calibrated temperature is ~true_t


def test_temperature_recovers_scale() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert 2.2 < t < 4.0
    assert nll(logits, y, t) < nll(logits, y, 1.0)


def test_temperature_degenerate_inputs() -> None:
    assert fit_temperature(np.zeros((1, 3)), [0]) == 1.0
    t = fit_temperature(np.array([[5.0, 0.0], [0.0, 5.0]]), [0, 1])  # separable: sharpen, bounded
    assert 0.05 <= t <= 1.0


def test_softmax_rows_sum_to_one() -> None:
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]), temperature=2.0)
    assert np.allclose(p.sum(1), 1.0) and np.isfinite(p).all()


def test_threshold_reaches_target_sensitivity() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=200)
    is_pos = rng.uniform(size=200) < scores  # informative scores
    for target in (0.5, 0.8, 0.9, 1.0):
        t = screening_threshold(scores, is_pos, target)
        sens, _ = sensitivity_specificity(scores, is_pos, t)
        assert sens >= target - 1e-12
        # Highest such threshold: any higher and sensitivity drops below the target.
        higher = np.min(scores[scores > t]) if (scores > t).any() else None
        if higher is not None:
            assert sensitivity_specificity(scores, is_pos, higher)[0] < target


def test_threshold_without_positives_is_neutral() -> None:
    assert screening_threshold(np.array([0.1, 0.9]), np.array([False, False]), 0.9) == 0.5


def test_positive_score_sums_classes() -> None:
    p = np.array([[0.2, 0.3, 0.5]])
    assert positive_score(p, [1, 2])[0] == pytest.approx(0.8)
