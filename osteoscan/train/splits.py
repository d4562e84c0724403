"""Stratified, group-aware splits: train / validation / test, or a test part plus K folds.

A *group* (from :func:`osteoscan.train.dedup.find_duplicates`: duplicate images and images of one
patient share one) is never split across parts, so no image, and no copy of it, is on both sides.
Within that constraint sklearn's :class:`~sklearn.model_selection.StratifiedGroupKFold` keeps the
class proportions of every part close to the whole. Everything is deterministic by ``seed``.

Indices refer to the caller's sample list; ``exclude`` (e.g. dedup's conflicting groups) keeps
samples out of every part. :meth:`Split.record` gives the JSON saved with the model.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from osteoscan.errors import UsageError


@dataclass
class Split:
    """Which sample indices are in the test part and in each (train, val) fold.

    A plain train/val/test split has one fold. With ``--folds K`` there are K folds whose
    validation parts are disjoint and cover every non-test sample once (out-of-fold predictions).
    """

    seed: int
    test: list[int]
    folds: list[tuple[list[int], list[int]]]
    excluded: list[int] = field(default_factory=list)
    method: str = "train_val_test"

    @property
    def train(self) -> list[int]:
        """Training indices of the first fold (the only fold of a train/val/test split)."""
        return self.folds[0][0]

    @property
    def val(self) -> list[int]:
        """Validation indices of the first fold."""
        return self.folds[0][1]

    def check_disjoint(self, groups: Sequence[str]) -> None:
        """Raise ``AssertionError`` if any group appears in two parts of the test/fold layout."""
        test_groups = {groups[i] for i in self.test}
        for k, (tr, va) in enumerate(self.folds):
            g_tr, g_va = {groups[i] for i in tr}, {groups[i] for i in va}
            if g_tr & g_va or g_tr & test_groups or g_va & test_groups:
                raise AssertionError(f"fold {k}: a group straddles parts of the split")
            if set(tr) & set(va) or (set(tr) | set(va)) & set(self.test):
                raise AssertionError(f"fold {k}: a sample is in two parts")

    def record(
        self,
        paths: Sequence[Any],
        labels: Sequence[str],
        groups: Sequence[str],
        root: Any | None = None,
    ) -> dict[str, Any]:
        """JSON-serialisable record: per part the paths (relative to ``root`` when given), their
        groups and per-class counts; saved with the model so the split can be audited/redone."""

        def rel(p: Any) -> str:
            text = str(p)
            if root is not None:
                prefix = str(root).rstrip("/\\") + "/"
                if text.startswith(prefix):
                    return text[len(prefix) :]
            return text

        def part(idx: Sequence[int]) -> dict[str, Any]:
            return {
                "n": len(idx),
                "counts": dict(sorted(Counter(labels[i] for i in idx).items())),
                "paths": [rel(paths[i]) for i in idx],
                "groups": sorted({groups[i] for i in idx}),
            }

        return {
            "method": self.method,
            "seed": self.seed,
            "test": part(self.test),
            "folds": [{"train": part(tr), "val": part(va)} for tr, va in self.folds],
            "excluded": [rel(paths[i]) for i in self.excluded],
        }


def _sgkf_parts(
    idx: np.ndarray, y: np.ndarray, g: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    n_groups = len(set(g.tolist()))
    if n_groups < n_splits:
        raise UsageError(
            f"only {n_groups} independent image group(s) for a {n_splits}-way split; "
            "add data or use fewer folds / a larger test fraction"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only N members": expected on small sets, not an error.
        warnings.simplefilter("ignore", UserWarning)
        return [(idx[a], idx[b]) for a, b in sgkf.split(idx, y, g)]


def _prepare(
    labels: Sequence[str], groups: Sequence[str], exclude: Iterable[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    if len(labels) != len(groups):
        raise ValueError("labels and groups must have one entry per sample")
    excluded = sorted(set(exclude))
    skip = set(excluded)
    keep = np.array([i for i in range(len(labels)) if i not in skip], dtype=np.int64)
    y = np.array([labels[i] for i in keep])
    g = np.array([groups[i] for i in keep])
    return keep, y, g, excluded


def _holdout(
    keep: np.ndarray, y: np.ndarray, g: np.ndarray, frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``keep`` into (rest, held-out) with about ``frac`` of the samples held out."""
    if not 0.0 < frac < 1.0:
        raise UsageError(f"split fraction must be between 0 and 1, got {frac}")
    n_splits = max(2, round(1.0 / frac))
    rest, held = _sgkf_parts(np.arange(len(keep)), y, g, n_splits, seed)[0]
    return rest, held


def _sorted(idx: Iterable[int]) -> list[int]:
    return sorted(int(i) for i in idx)


def train_val_test_split(
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    val_frac: float = 0.15,
    test_frac: float = 0.2,
    seed: int = 0,
    exclude: Iterable[int] = (),
) -> Split:
    """Stratified group-aware train / validation / test split.

    Fractions are approximate: each part is one fold of a ``round(1/frac)``-fold
    StratifiedGroupKFold. ``test_frac=0`` gives no test part.
    """
    keep, y, g, excluded = _prepare(labels, groups, exclude)
    if test_frac > 0:
        rest, test = _holdout(keep, y, g, test_frac, seed)
    else:
        rest, test = np.arange(len(keep)), np.array([], dtype=np.int64)
    # Validation fraction is of the whole, so rescale it to the remaining part.
    val_of_rest = val_frac / max(1e-9, 1.0 - (test_frac if test_frac > 0 else 0.0))
    tr, va = _holdout(keep[rest], y[rest], g[rest], min(0.5, val_of_rest), seed + 1)
    return Split(
        seed=seed,
        test=_sorted(keep[test]),
        folds=[(_sorted(keep[rest][tr]), _sorted(keep[rest][va]))],
        excluded=excluded,
        method="train_val_test",
    )


def kfold_split(
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    k: int = 5,
    test_frac: float = 0.2,
    seed: int = 0,
    exclude: Iterable[int] = (),
) -> Split:
    """A stratified group-aware test part, then ``k`` stratified group-aware folds of the rest."""
    if k < 2:
        raise UsageError(f"--folds must be at least 2, got {k}")
    keep, y, g, excluded = _prepare(labels, groups, exclude)
    if test_frac > 0:
        rest, test = _holdout(keep, y, g, test_frac, seed)
    else:
        rest, test = np.arange(len(keep)), np.array([], dtype=np.int64)
    folds = [
        (_sorted(keep[rest][tr]), _sorted(keep[rest][va]))
        for tr, va in _sgkf_parts(np.arange(len(rest)), y[rest], g[rest], k, seed + 1)
    ]
    return Split(
        seed=seed, test=_sorted(keep[test]), folds=folds, excluded=excluded, method=f"kfold{k}"
    )
