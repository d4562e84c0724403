"""End-to-end tests for `osteoscan evaluate` on synthetic labelled images and a tiny package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from osteoscan.covariates import write_covariates_csv
from osteoscan.errors import UsageError
from osteoscan.testing.synthetic import synthetic_knee, write_png

CLASSES = ["normal", "osteopenia", "osteoporosis"]
DENSITY = {"normal": 1.0, "osteopenia": 0.65, "osteoporosis": 0.3}
AGE = {"normal": 45.0, "osteopenia": 60.0, "osteoporosis": 72.0}
PREFIX = {"normal": "N", "osteopenia": "OP", "osteoporosis": "OS"}  # as in knee-xray
TOP_KEYS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "roc_auc",
    "confusion_matrix",
    "n",
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Folder-per-class synthetic knees (5 per class) and a covariates CSV keyed by stem."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for c in CLASSES:
        for k in range(5):
            stem = f"{PREFIX[c]}{k}"
            write_png(
                root / c / f"{stem}.png",
                synthetic_knee(64, seed=100 * k + len(c), density=DENSITY[c]),
                bits=8,
            )
            rows.append((stem, AGE[c] + k, "F" if k % 2 else "M"))
    rows[0] = (rows[0][0], None, None)  # one image without covariates
    csv = write_covariates_csv(root.parent / f"{root.name}_cov.csv", rows)
    return root, csv


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-member package with a covariate-fusion model, positives = osteoporosis."""
    import torch

    from osteoscan.archs import create_model
    from osteoscan.fusion import fit_fusion
    from osteoscan.package import Manifest, MemberSpec, save_package

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    ages = np.array([AGE[CLASSES[i]] for i in y]) + rng.normal(0, 4, 90)
    sexes = [["M", "F"][int(s)] for s in rng.integers(0, 2, 90)]
    img = rng.dirichlet(np.ones(3), 90)
    fusion = fit_fusion(img, ages, sexes, y, CLASSES)
    fusion["thresholds"] = {"image_only": 0.25, "combined": 0.4}  # as the trainer stores them
    manifest = Manifest(
        name="tiny-eval",
        version="0.0.1",
        classes=CLASSES,
        positive_classes=["osteoporosis"],
        threshold=0.4,
        preprocess={"size": 48},
        covariates=["age", "sex"],
        fusion=fusion,
        members=[MemberSpec.for_arch("tiny_cnn", input_size=48) for _ in range(2)],
    )
    models = [create_model("tiny_cnn", 3) for _ in range(2)]
    return save_package(tmp_path_factory.mktemp("pkg") / "tiny-eval", manifest, models)


def test_evaluate_model_reports_all_variants(labelled: tuple[Path, Path], package: Path) -> None:
    from osteoscan.evaluate import evaluate_model

    data, csv = labelled
    rep = evaluate_model(data, package, covariates_csv=csv, device="cpu", batch_size=4, n_boot=50)
    for key in TOP_KEYS:
        assert key in rep, key
    assert rep["n"] == 15 and rep["classes"] == CLASSES and rep["threshold"] == pytest.approx(0.4)
    assert sum(map(sum, rep["confusion_matrix"]["matrix"])) == 15
    assert set(rep["variants"]) == {"image_only", "covariates_only", "combined"}
    assert rep["primary"] == "combined"
    # Each variant is thresholded the way scan thresholds it.
    assert rep["variants"]["image_only"]["threshold"] == pytest.approx(0.25)
    assert rep["variants"]["combined"]["threshold"] == pytest.approx(0.4)
    assert rep["thresholds"] == pytest.approx({"image_only": 0.25, "combined": 0.4})
    assert rep["covariates"]["n_fused"] == 14
    assert rep["variants"]["covariates_only"]["n"] == 14  # one image has no covariates
    # Ages separate the classes perfectly here: covariates alone must rank osteoporosis first.
    assert rep["variants"]["covariates_only"]["roc_auc"]["value"] > 0.9
    assert rep["covariates"]["n_with_age"] == 14 and rep["covariates"]["n_with_sex"] == 14
    for key in ("accuracy", "sensitivity", "roc_auc"):
        cell = rep[key]
        assert set(cell) >= {"value", "ci95"}
    assert "per_class" in rep and set(rep["per_class"]) == set(CLASSES)
    assert rep["model"]["name"] == "tiny-eval" and rep["errors"] == []
    json.dumps(rep)


def test_binary_data_collapses_and_unreadable_files_are_listed(
    labelled: tuple[Path, Path], package: Path, tmp_path: Path
) -> None:
    from osteoscan.evaluate import evaluate_model

    data, _ = labelled
    for c in ("normal", "osteoporosis"):
        (tmp_path / c).mkdir()
        for p in sorted((data / c).glob("*.png"))[:3]:
            (tmp_path / c / p.name).write_bytes(p.read_bytes())
    (tmp_path / "normal" / "broken.png").write_bytes(b"not a png at all")
    rep = evaluate_model(tmp_path, package, device="cpu", n_boot=0)
    assert rep["class_mapping"]["mode"] == "collapsed"
    assert rep["classes"] == ["other", "osteoporosis"] and rep["n"] == 6
    assert [Path(e["path"]).name for e in rep["errors"]] == ["broken.png"]
    # No covariates given: only the image-only result, at the image-only threshold.
    assert set(rep["variants"]) == {"image_only"} and rep["primary"] == "image_only"
    assert rep["threshold"] == pytest.approx(0.25) and rep["covariates"]["n_fused"] == 0


def test_foreign_class_is_usage_error(tmp_path: Path, package: Path) -> None:
    from osteoscan.evaluate import map_classes

    with pytest.raises(UsageError, match="osteopenia"):
        map_classes(["normal", "osteopenia"], ["normal", "osteoporosis"], ["osteoporosis"])
    assert map_classes(CLASSES, CLASSES, ["osteoporosis"])[2] == "direct"
    # data without any positive class: keep the model's classes (screening metrics undefined)
    assert map_classes(["normal", "osteopenia"], CLASSES, ["osteoporosis"])[2] == "direct"


def test_cli_prints_table_and_writes_json(
    labelled: tuple[Path, Path], package: Path, tmp_path: Path
) -> None:
    from osteoscan.cli import app

    data, csv = labelled
    out = tmp_path / "rep" / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--data",
            str(data),
            "--model",
            str(package),
            "--covariates",
            str(csv),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--bootstrap",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "95 % CI" in result.output and "ROC-AUC" in result.output
    assert "covariates only" in result.output and "confusion matrix" in result.output
    saved = json.loads(out.read_text())
    for key in TOP_KEYS:
        assert key in saved
    assert saved["n"] == 15


def test_cli_usage_errors(labelled: tuple[Path, Path], package: Path, tmp_path: Path) -> None:
    from osteoscan.cli import main

    data, csv = labelled
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", str(tmp_path / "missing"), "--model", str(package)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                "--data",
                str(data),
                "--model",
                str(package),
                "--covariates",
                str(csv),
                "--covariate-columns",
                "path,age",
            ]
        )
    assert exc.value.code == 2


KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"


def _knees(root: Path, seed: int, per_class: int = 6) -> Path:
    for c, (label, density) in enumerate((("normal", 1.0), ("osteoporosis", 0.3))):
        for i in range(per_class):
            img = synthetic_knee(64, seed=seed + 40 * c + i, density=density)
            write_png(root / label / f"{label[:3]}{i}.png", img)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training folder, the package trained on it: 2 folds, so every image was trained on)."""
    from osteoscan.train.recipe import make_config
    from osteoscan.train.trainer import train

    data = _knees(tmp_path_factory.mktemp("train"), seed=0)
    cfg = make_config(
        None, data=data, out=tmp_path_factory.mktemp("pkg") / "fp", archs=("tiny_cnn",),
        random_init=True, size=32, epochs=1, stage1_epochs=0, batch_size=4, n_boot=10,
        folds=2, read_workers=1, name="fp",
    )  # fmt: skip
    return data, train(cfg)


def test_package_records_training_fingerprints(trained: tuple[Path, Path]) -> None:
    from osteoscan.hashing import file_sha256
    from osteoscan.package import read_manifest
    from osteoscan.train.fingerprints import TrainingFingerprints

    data, pkg = trained
    fps = TrainingFingerprints.from_record(read_manifest(pkg).training_fingerprints)
    assert fps is not None and len(fps) == 12
    assert all(fps.match(file_sha256(p)) == "file" for p in data.rglob("*.png"))


def test_evaluate_warns_on_training_images(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import cv2

    from osteoscan.evaluate import evaluate_model

    data, pkg = trained
    rep = evaluate_model(data, pkg, n_boot=0)
    ov = rep["training_overlap"]
    assert ov["checked"] and ov["n_images"] == 12 == ov["same_file"] and ov["n_scored"] == 12
    assert (
        rep["warnings"]
        and "12 of 12 scored images were in the model's training" in rep["warnings"][0]
    )
    # New images: no overlap. The same pixels re-encoded (other bytes): found by pixel hash.
    fresh = _knees(tmp_path / "new", seed=500)
    src = data / "normal" / "nor0.png"
    again = fresh / "normal" / "copy.png"
    cv2.imwrite(
        str(again), cv2.imread(str(src), cv2.IMREAD_UNCHANGED), [cv2.IMWRITE_PNG_COMPRESSION, 0]
    )
    assert again.read_bytes() != src.read_bytes()
    rep = evaluate_model(fresh, pkg, n_boot=0)
    ov = rep["training_overlap"]
    assert (ov["n_images"], ov["same_file"], ov["same_pixels"]) == (1, 0, 1)
    assert ov["n_scored"] == 13 and len(rep["warnings"]) == 1


def test_evaluate_cli_prints_the_overlap_warning(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from osteoscan.cli import app

    data, pkg = trained
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app, ["evaluate", "--data", str(data), "--model", str(pkg), "--bootstrap", "0",
              "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning: 12 of 12 scored images were in the model's training data" in res.output
    assert json.loads(out.read_text())["training_overlap"]["n_images"] == 12


def test_older_package_without_fingerprints_is_not_checked(
    labelled: tuple[Path, Path], package: Path
) -> None:
    from osteoscan.evaluate import evaluate_model

    rep = evaluate_model(labelled[0], package, n_boot=0)
    assert rep["training_overlap"]["checked"] is False
    assert not any("training data" in w for w in rep["warnings"])


@pytest.mark.skipif(not KNEE.is_dir(), reason="../shared/data/knee-xray not present")
def test_default_model_warns_on_its_own_training_images(tmp_path: Path) -> None:
    """The bundled model was trained on knee-xray: evaluating on those images says so."""
    from osteoscan.evaluate import evaluate_model
    from osteoscan.package import read_manifest, resolve_package

    split = read_manifest(resolve_package("knee-default")).training_data["split"]
    trained = split["folds"][0]["train"]["paths"]  # relative to the knee-xray folder
    picks = [KNEE / r for c in ("normal/", "osteoporosis/") for r in trained if r.startswith(c)][
        ::10
    ][:6]
    # An image left out of training (a conflicting duplicate) is not reported as seen.
    left_out = [KNEE / r for r in split["excluded"]][:1]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in picks + left_out))
    rep = evaluate_model(labels, "knee-default", n_boot=0, device="cpu")
    n = len(picks)
    assert rep["training_overlap"]["n_images"] == n == rep["data"]["n_scored"] - 1 >= 4
    assert f"{n} of {n + 1} scored images were in the model's training data" in rep["warnings"][0]


def test_evaluate_says_where_covariates_came_from(
    labelled: tuple[Path, Path], package: Path, tmp_path: Path
) -> None:
    from osteoscan.evaluate import evaluate_model

    data, csv = labelled
    rep = evaluate_model(data, package, covariates_csv=csv, n_boot=0)
    src = rep["covariates"]["sources"]
    assert (src["n_images"], src["from_csv"], src["none"]) == (15, 14, 1)
    assert src["warnings"] == [] and rep["warnings"] == []
    other = tmp_path / "other.csv"
    other.write_text("path,age,sex\nP001,sixty,F\nP002,70,X\n")
    rep = evaluate_model(data, package, covariates_csv=other, n_boot=0)
    assert rep["covariates"]["sources"]["none"] == 15 and rep["covariates"]["n_fused"] == 0
    assert any("none of its 2 rows matches an image" in w for w in rep["warnings"])
    assert any("2 unusable value(s)" in w and "'sixty'" in w for w in rep["warnings"])
