"""Held-out evaluation of a trained ensemble: covariate fusion, thresholds, honest metrics.

The covariate stacker (:func:`osteoscan.fusion.fit_fusion`) is fitted on validation (split) or
out-of-fold (K-fold) predictions. With K folds the reported combined / covariates-only numbers are
*cross-fitted* (stacker fitted on the other folds' OOF rows), so no reported number comes from a
model that saw the rows it is scored on. The screening threshold reaches ``target_sensitivity``
on those held-out scores; rows scanned without covariates get the image-only threshold.

An ordinal model also gets grade cut-offs (:mod:`osteoscan.grades`), fitted on the same rows as
the threshold; with K folds the reported grades of each fold come from cut-offs fitted on the
other folds, like the fusion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from osteoscan.covariates import Covariates
from osteoscan.fusion import apply_covariates_only, apply_fusion, fit_fusion
from osteoscan.grades import cross_fitted_predictions, fit_grade_cutoffs, predict_classes
from osteoscan.metrics import classification_metrics
from osteoscan.train.calibrate import positive_score, screening_threshold
from osteoscan.train.recipe import TrainConfig

Fusion = dict[str, Any]


class _Rows:
    """Labels and covariates of every row, and the fits that need them."""

    def __init__(self, cfg: TrainConfig, classes: list[str], y: np.ndarray, covs: list[Covariates]):
        self.cfg, self.classes, self.y = cfg, classes, y
        self.pos_idx = [classes.index(c) for c in cfg.positive]
        self.ages = np.array([np.nan if c.age is None else c.age for c in covs], dtype=np.float64)
        self.sexes = [c.sex for c in covs]
        self.has_cov = np.array([not c.is_empty() for c in covs])
        self.is_pos = np.isin(y, self.pos_idx)
        self.cutoffs: list[float] | None = None  # ordinal models: fitted by fit_cutoffs
        self.fold_of: np.ndarray | None = None

    def fit_cutoffs(self, rows: np.ndarray, probs: np.ndarray) -> list[float] | None:
        """Grade cut-offs of an ordinal model fitted on ``rows`` (None for other models)."""
        if self.cfg.ordinal and len(rows):
            self.cutoffs = fit_grade_cutoffs(probs, self.y[rows])
        return self.cutoffs

    def predicted(self, rows: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
        """Reported grades of ``rows`` (None: argmax). Cross-fitted over folds when known."""
        if self.cutoffs is None:
            return None
        if self.fold_of is not None:
            return cross_fitted_predictions(probs, self.y[rows], self.fold_of[rows])
        return predict_classes(probs, self.cutoffs)

    def threshold(self, rows: np.ndarray, probs: np.ndarray) -> float:
        score = positive_score(probs, self.pos_idx)
        return screening_threshold(score, self.is_pos[rows], self.cfg.target_sensitivity)

    def fit(self, rows: np.ndarray, probs: np.ndarray) -> Fusion | None:
        if not self.cfg.use_covariates or not self.has_cov[rows].any():
            return None
        try:
            fus = fit_fusion(probs, self.ages[rows], self.sx(rows), self.y[rows], self.classes)
        except ValueError:
            return None
        return fus if fus.get("models") else None

    def sx(self, rows: np.ndarray) -> list[str | None]:
        return [self.sexes[i] for i in rows]

    def apply(
        self, fusion: Fusion, rows: np.ndarray, probs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(combined, covariates-only) probabilities of ``rows``."""
        comb = apply_fusion(fusion, probs, self.ages[rows], self.sx(rows))[0]
        return comb, apply_covariates_only(fusion, self.ages[rows], self.sx(rows))[0]

    def metrics(self, rows: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
        return classification_metrics(
            self.y[rows], probs, self.classes, list(self.cfg.positive), threshold,
            n_boot=self.cfg.n_boot, seed=self.cfg.seed, ordinal=self.cfg.ordinal,
            pred=self.predicted(rows, probs),
        )  # fmt: skip


def _cross_fitted(
    r: _Rows, ev: np.ndarray, ev_probs: np.ndarray, fold_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each fold's rows fused by a stacker fitted on the other folds' rows."""
    comb, cov = ev_probs.copy(), np.full_like(ev_probs, np.nan)
    for k in np.unique(fold_of[ev]):
        inside = fold_of[ev] == k
        sub = r.fit(ev[~inside], ev_probs[~inside])
        if sub is not None:
            comb[inside], cov[inside] = r.apply(sub, ev[inside], ev_probs[inside])
    return comb, cov


def evaluate_heldout(
    cfg: TrainConfig, classes: list[str], y: np.ndarray, covs: list[Covariates],
    cal: np.ndarray, cal_probs: np.ndarray, ev: np.ndarray, ev_probs: np.ndarray,
    fold_of: np.ndarray | None,
) -> tuple[Fusion | None, float, float | None, dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """Fit fusion, choose the threshold and compute held-out metrics.

    ``cal``/``cal_probs``: rows (and calibrated image probabilities) to fit on; ``ev``/``ev_probs``:
    rows to report on. K-fold mode passes the OOF rows as both, with ``fold_of`` to cross-fit.
    Returns (fusion, threshold, image-only threshold, metrics, {variant: eval probabilities}):
    with fusion, ``threshold`` is for fused scores and rows scanned without covariates (scored on
    the image alone) need the image-only one; without fusion that is ``None``. An ordinal
    model's grade cut-offs (fitted on the image-only ``cal_probs``) are in
    ``metrics["grade_cutoffs"]``.
    """
    r = _Rows(cfg, classes, y, covs)
    r.fold_of = fold_of
    cutoffs = r.fit_cutoffs(cal, cal_probs)
    fusion = r.fit(cal, cal_probs)
    out: dict[str, np.ndarray] = {"image_only": ev_probs}
    img_thr = threshold = r.threshold(cal, cal_probs)
    metrics: dict[str, Any] = {"image_only": r.metrics(ev, ev_probs, img_thr)}
    if fusion is not None:
        if fold_of is None:
            comb_cal, cov_cal = r.apply(fusion, cal, cal_probs)
            comb_ev, cov_ev = r.apply(fusion, ev, ev_probs)
        else:
            comb_ev, cov_ev = _cross_fitted(r, ev, ev_probs, fold_of)
            comb_cal, cov_cal = comb_ev, cov_ev
        threshold = r.threshold(cal, comb_cal)
        metrics["combined"] = r.metrics(ev, comb_ev, threshold)
        out["combined"] = comb_ev
        ok_cal, ok_ev = ~np.isnan(cov_cal).any(1), ~np.isnan(cov_ev).any(1)
        if ok_ev.sum() >= 2 and ok_cal.any():
            cthr = r.threshold(cal[ok_cal], cov_cal[ok_cal])
            metrics["covariates_only"] = r.metrics(ev[ok_ev], cov_ev[ok_ev], cthr)
            out["covariates_only"] = cov_ev
    metrics["coverage"] = {"rows": int(len(ev)), "with_covariates": int(r.has_cov[ev].sum())}
    if cutoffs is not None:
        metrics["grade_cutoffs"] = cutoffs
    return fusion, float(threshold), None if fusion is None else float(img_thr), metrics, out
