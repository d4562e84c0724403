"""Tests for stratified group-aware splits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from osteoscan.errors import UsageError
from osteoscan.train.splits import kfold_split, train_val_test_split


def _data(n_groups: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """Groups of 1-4 images each; a group's images share a label (like one patient)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(n_groups):
        label = rng.choice(["normal", "osteopenia", "osteoporosis"], p=[0.2, 0.6, 0.2])
        for _ in range(int(rng.integers(1, 5))):
            labels.append(str(label))
            groups.append(f"p{g}")
    return labels, groups


def _groups(idx: list[int], groups: list[str]) -> set[str]:
    return {groups[i] for i in idx}


def test_train_val_test_groups_never_straddle() -> None:
    labels, groups = _data()
    split = train_val_test_split(labels, groups, val_frac=0.15, test_frac=0.2, seed=3)
    split.check_disjoint(groups)
    tr, va, te = (
        _groups(split.train, groups),
        _groups(split.val, groups),
        _groups(split.test, groups),
    )
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert sorted(split.train + split.val + split.test) == list(range(len(labels)))
    # roughly the asked fractions, and every class in every part
    n = len(labels)
    assert 0.1 < len(split.test) / n < 0.3 and 0.05 < len(split.val) / n < 0.3
    for part in (split.train, split.val, split.test):
        assert set(Counter(labels[i] for i in part)) == {"normal", "osteopenia", "osteoporosis"}


def test_kfold_covers_rest_once_and_is_disjoint() -> None:
    labels, groups = _data()
    split = kfold_split(labels, groups, k=4, test_frac=0.2, seed=1)
    split.check_disjoint(groups)
    assert len(split.folds) == 4
    vals = [i for _, va in split.folds for i in va]
    assert sorted(vals) == sorted(set(range(len(labels))) - set(split.test))
    for tr, va in split.folds:
        assert not _groups(tr, groups) & _groups(va, groups)
        assert not (_groups(tr, groups) | _groups(va, groups)) & _groups(split.test, groups)


def test_deterministic_by_seed_and_seed_matters() -> None:
    labels, groups = _data()
    a = train_val_test_split(labels, groups, seed=7)
    b = train_val_test_split(labels, groups, seed=7)
    c = train_val_test_split(labels, groups, seed=8)
    assert a.test == b.test and a.folds == b.folds
    assert a.test != c.test


def test_excluded_samples_are_nowhere_and_record_is_json() -> None:
    labels, groups = _data()
    excluded = [0, 5, 9]
    split = kfold_split(labels, groups, k=3, exclude=excluded, seed=0)
    used = set(split.test) | {i for tr, va in split.folds for i in tr + va}
    assert not used & set(excluded)
    paths = [f"/data/{labels[i]}/img{i}.png" for i in range(len(labels))]
    rec = split.record(paths, labels, groups, root="/data")
    again = json.loads(json.dumps(rec))
    assert again["method"] == "kfold3" and again["seed"] == 0
    assert again["test"]["n"] == len(split.test)
    assert again["excluded"] == [f"{labels[i]}/img{i}.png" for i in excluded]
    assert sum(again["test"]["counts"].values()) == len(split.test)
    assert not set(again["test"]["groups"]) & set(again["folds"][0]["train"]["groups"])


def test_check_disjoint_detects_straddling() -> None:
    labels, groups = _data()
    split = train_val_test_split(labels, groups, seed=0)
    leaked = list(groups)
    leaked[split.test[0]] = groups[split.train[0]]  # pretend a test image shares a train group
    with pytest.raises(AssertionError):
        split.check_disjoint(leaked)


def test_too_few_groups_is_usage_error() -> None:
    with pytest.raises(UsageError, match="group"):
        kfold_split(["normal", "osteoporosis"] * 2, ["a", "a", "b", "b"], k=5, test_frac=0.5)
