"""Tests for report figures (osteoscan.report) and the model card (osteoscan.card)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from osteoscan.card import KNEE_XRAY_SOURCE, detect_source, write_card
from osteoscan.metrics import classification_metrics
from osteoscan.report import confusion_png, render_report, roc_png, training_curves_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["normal", "osteopenia", "osteoporosis"]


def _preds(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = rng.dirichlet(np.ones(3), n) * 0.6 + np.eye(3)[y] * 0.4
    return y, p


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_figures_are_pngs() -> None:
    y, p = _preds()
    w, h = _png_size(roc_png(y, p, CLASSES, ["osteoporosis"]))
    assert w > 200 and h > 200
    _png_size(confusion_png([[5, 1, 0], [2, 7, 1], [0, 0, 0]], CLASSES))  # empty row is fine
    history = [
        {
            "epoch": e,
            "member": m,
            "stage": 1,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.2 / (e + 1),
            "val_auc": 0.5 + 0.05 * e,
            "lr": 1e-3,
        }
        for m in ("fold0", "fold1")
        for e in range(5)
    ]
    _png_size(training_curves_png(history))
    _png_size(training_curves_png([]))


def test_render_report_names(tmp_path: Path) -> None:
    y, p = _preds()
    figs = render_report(y, p, CLASSES, ["osteoporosis"], history=[{"epoch": 0, "val_auc": 0.6}])
    assert set(figs) == {"roc.png", "confusion_matrix.png", "training_curves.png"}
    for name, data in figs.items():
        (tmp_path / name).write_bytes(data)
        _png_size(data)
    assert "training_curves.png" not in render_report(y, p, CLASSES, ["osteoporosis"])


def test_roc_with_single_class_does_not_crash() -> None:
    y = np.zeros(10, dtype=int)
    p = np.tile([0.6, 0.3, 0.1], (10, 1))
    _png_size(roc_png(y, p, CLASSES, ["osteoporosis"]))


def _manifest() -> dict:
    return {
        "name": "knee-test",
        "version": "1.0",
        "classes": CLASSES,
        "positive_classes": ["osteoporosis"],
        "threshold": 0.31,
        "target_sensitivity": 0.9,
        "body_parts": ["knee"],
        "preprocess": {"size": 224},
        "covariates": ["age", "sex"],
        "members": [{"arch": "efficientnet_b0", "fold": 0}, {"arch": "efficientnet_b0", "fold": 1}],
        "created_at": "2024-01-01T00:00:00Z",
    }


def test_card_for_knee_xray_has_everything() -> None:
    y, p = _preds()
    m = classification_metrics(y, p, CLASSES, ["osteoporosis"], 0.31, n_boot=100)
    metrics = {"image_only": m, "covariates_only": m, "combined": m}
    summary = {
        "source": dict(KNEE_XRAY_SOURCE),
        "counts": {"normal": 29, "osteopenia": 122, "osteoporosis": 39},
        "duplicates": {"n_duplicate_groups": 21, "n_conflicting_groups": 7, "n_dropped": 15},
        "split": "train 112 / val 28 / test 35, group-aware",
    }
    cmd = "osteoscan train --data ../shared/data/knee-xray --out models/k --preset quick"
    card = write_card(_manifest(), metrics, summary, cmd)
    for needle in (
        "NOT FOR CLINICAL USE",
        "Intended use",
        "Wani",
        "Arora",
        "2021",
        "Knee X-ray Osteoporosis Database",
        "10.17632/fxjm8fb6mw.2",
        "CC BY 4.0",
        "quantitative ultrasound",
        "21 duplicate groups",
        "7 with conflicting labels",
        "Image only",
        "Covariates only",
        "Image + covariates",
        cmd,
        "torch",
        "python",
        "Known failure modes",
        "efficientnet_b0 (fold 0)",
    ):
        assert needle in card, needle
    auc = m["roc_auc"]
    assert f"{auc['value']:.3f} ({auc['ci95'][0]:.3f} – {auc['ci95'][1]:.3f})" in card


def test_card_generic_source_and_no_metrics() -> None:
    card = write_card(_manifest(), None, {"data": "/data/my-knees"}, "osteoscan train ...")
    assert "NOT FOR CLINICAL USE" in card and "/data/my-knees" in card
    assert "fxjm8fb6mw" not in card
    assert "No held-out metrics" in card


def test_detect_source(tmp_path: Path) -> None:
    assert detect_source(tmp_path) is None
    (tmp_path / "README.md").write_text(
        "Knee X-ray Osteoporosis Database, doi:10.17632/fxjm8fb6mw.2"
    )
    assert detect_source(tmp_path)["doi"] == "10.17632/fxjm8fb6mw.2"
    assert detect_source(tmp_path / "labels.csv") is not None  # a CSV in that folder


@pytest.mark.skipif(not Path("/work/shared/data/knee-xray").is_dir(), reason="no knee-xray data")
def test_detect_real_knee_source() -> None:
    assert detect_source("/work/shared/data/knee-xray") == KNEE_XRAY_SOURCE


def _auc_metrics(value: float, lo: float, hi: float) -> dict:
    cell = {"value": value, "ci95": [lo, hi]}
    return {"accuracy": cell, "n": 100, "roc_auc": {**cell, "macro": cell, "per_class": {}}}


def test_card_metric_labels_keep_their_parentheses() -> None:
    y, p = _preds()
    m = classification_metrics(y, p, CLASSES, ["osteoporosis"], 0.31, n_boot=50)
    card = write_card(_manifest(), {"image_only": m, "combined": m}, None, "cmd")
    for label in ("| n (images) |", "| accuracy (argmax) |", "| ROC-AUC macro (one-vs-rest) |",
                  "| sensitivity (osteoporosis vs rest) |"):  # fmt: skip
        assert label in card, label


def test_card_says_plainly_when_the_image_adds_nothing() -> None:
    metrics = {
        "image_only": _auc_metrics(0.56, 0.44, 0.67),
        "covariates_only": _auc_metrics(0.885, 0.81, 0.94),
        "combined": _auc_metrics(0.884, 0.81, 0.94),
    }
    card = write_card(_manifest(), metrics, None, "cmd")
    assert "not distinguishable from chance" in card
    assert "adds nothing measurable over age and sex" in card
    metrics["image_only"] = _auc_metrics(0.75, 0.66, 0.83)
    metrics["combined"] = _auc_metrics(0.95, 0.91, 0.98)
    card = write_card(_manifest(), metrics, None, "cmd")
    assert "above chance" in card and "a gain over age and sex alone." in card
