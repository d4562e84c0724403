"""Any labels: class folders or CSV labels with any names, ``--positive``, ``--classes``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from osteoscan.errors import UsageError
from osteoscan.testing.synthetic import synthetic_knee, write_png
from osteoscan.train.data import load_labelled, order_classes
from tests.conftest import run_main as _main

DENSITY = {"0": 1.1, "1": 0.9, "2": 0.7, "3": 0.5, "4": 0.3}


def _grades(root: Path, per_class: int = 6, size: int = 48) -> Path:
    """Folders 0..4 of synthetic knees whose density falls with the grade."""
    for g, density in DENSITY.items():
        for i in range(per_class):
            img = synthetic_knee(size, seed=40 * int(g) + i, density=density)
            write_png(root / g / f"k{g}_{i}.png", img)
    return root


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--arch", "tiny_cnn", "--random-init",
        "--preset", "quick", "--size", "32", "--epochs", "2", "--batch-size", "8", "--folds", "1",
        "--quiet", "--seed", "1", *extra,
    ]  # fmt: skip


def test_class_order_rules() -> None:
    assert order_classes({"osteoporosis", "normal"}) == ["normal", "osteoporosis"]
    assert order_classes({"10", "2", "0"}) == ["0", "2", "10"]  # numeric, not "10" < "2"
    assert order_classes({"no_fracture", "fracture"}) == ["fracture", "no_fracture"]


def test_classes_option_fixes_the_order_and_refuses_unknown_labels(tmp_path: Path) -> None:
    _grades(tmp_path, per_class=1)
    _, classes = load_labelled(tmp_path, ["4", "3", "2", "1", "0"])
    assert classes == ["4", "3", "2", "1", "0"]
    with pytest.raises(UsageError, match="not in --classes"):
        load_labelled(tmp_path, ["0", "1", "2"])


def test_csv_paths_resolve_against_the_csv_folder(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "set"
    write_png(data / "img" / "a.png", synthetic_knee(32, seed=1))
    write_png(data / "img" / "b.png", synthetic_knee(32, seed=2))
    (data / "labels.csv").write_text("path,label,group\nimg/a.png,fracture,p1\nimg/b.png,none,\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: relative paths must not follow the working folder
    samples, classes = load_labelled(Path("set") / "labels.csv")
    assert classes == ["fracture", "none"]
    assert all(s.path.is_file() for s in samples)
    assert [s.group for s in samples] == ["p1", None]


def test_train_grade_folders_and_scan_scores_positive_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _grades(tmp_path / "kl")
    out = tmp_path / "kl-model"
    code, text = _main(_args(data, out, "--classes", "0,1,2,3,4"), capsys)
    assert code == 2 and "--positive is required" in text  # 0..4 is not the osteoporosis set
    assert not (out / "manifest.json").exists()
    code, text = _main(_args(data, out, "--classes", "0,1,2,3,4", "--positive", "2,3,4"), capsys)
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["0", "1", "2", "3", "4"]
    assert manifest["positive_classes"] == ["2", "3", "4"]
    assert "classes: 0 (6), 1 (6), 2 (6), 3 (6), 4 (6)" in text

    # scan with the grade model: one p_<class> column per grade, score = P(2) + P(3) + P(4).
    images = tmp_path / "to-scan"
    for i in range(3):
        write_png(images / f"x{i}.png", synthetic_knee(48, seed=900 + i, density=0.6))
    csv = tmp_path / "results.csv"
    code, text = _main(["scan", str(images), "--model", str(out), "--out", str(csv)], capsys)
    assert code == 0, text
    import csv as csvlib

    rows = list(csvlib.DictReader(csv.open()))
    assert len(rows) == 3
    for row in rows:
        p = [float(row[f"p_{g}"]) for g in "01234"]
        assert abs(sum(p) - 1.0) < 1e-4
        assert abs(float(row["score"]) - sum(p[2:])) < 1e-4
        assert row["prediction"] in DENSITY


def test_train_fracture_folders_named_freely(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "fx"
    for c, (label, density) in enumerate((("fracture", 0.3), ("no_fracture", 1.0))):
        for i in range(8):
            write_png(data / label / f"{c}{i}.png", synthetic_knee(48, seed=60 * c + i,
                                                                   density=density))  # fmt: skip
    out = tmp_path / "fx-model"
    code, text = _main(_args(data, out, "--positive", "fracture"), capsys)
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["fracture", "no_fracture"]
    assert manifest["positive_classes"] == ["fracture"]
    assert manifest["metrics"]["image_only"]["roc_auc"]["value"] is not None
    code, text = _main(_args(data, tmp_path / "x", "--positive", "osteoporosis"), capsys)
    assert code == 2 and "not among the classes" in text
    assert np.isfinite(manifest["threshold"]) and os.path.isdir(out)
