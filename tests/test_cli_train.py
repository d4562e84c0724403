"""Tests for `osteoscan train`: options reach the trainer, a package is written, errors map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from osteoscan.cli import app
from osteoscan.testing.synthetic import synthetic_knee, write_png
from tests.conftest import run_main as _main

KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"
KNEE = Path(os.environ.get("OSTEOSCAN_KNEE_XRAY", KNEE))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-knees")
    rows = ["Patient Id,Age,Gender"]
    for c, (label, density) in enumerate((("normal", 1.0), ("osteoporosis", 0.3))):
        for i in range(10):
            stem = f"{label[:3]}{i}"
            write_png(
                root / label / f"{stem}.png", synthetic_knee(64, seed=50 * c + i, density=density)
            )
            rows.append(f"{stem},{45 + 25 * c + i},{'female' if i % 2 else 'male'}")
    (root / "patient_details.csv").write_text("\n".join(rows) + "\n")
    return root


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(folder), "--out", str(out), "--arch", "tiny_cnn", "--random-init",
        "--preset", "quick", "--size", "48", "--epochs", "2", "--batch-size", "8", "--folds", "2",
        "--covariates", str(folder / "patient_details.csv"),
        "--covariate-columns", "Patient Id,Age,Gender", "--seed", "3", *extra,
    ]  # fmt: skip


def test_cli_train_writes_package_and_logs(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "my-model"
    res = CliRunner().invoke(app, _args(folder, out, "--quiet"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "my-model"
    assert manifest["classes"] == ["normal", "osteoporosis"]
    assert len(manifest["members"]) == 2
    assert manifest["covariates"] == ["age", "sex"]
    assert manifest["extra"]["train_config"]["preset"] == "quick"
    assert manifest["extra"]["train_config"]["epochs"] == 2
    assert manifest["command"].startswith("osteoscan train --data")
    assert "--random-init" in manifest["command"]
    # Plain, timestamped log lines (no terminal) with per-epoch validation AUC.
    assert "osteoscan train: member 1/2 epoch 1/2" in res.output
    assert "val_auc" in res.output
    assert "image only" in res.output and "ROC-AUC" in res.output


def test_cli_train_roi_and_clahe_reach_the_package(folder: Path, tmp_path: Path) -> None:
    """--roi/--clahe land in the manifest's preprocessing, which scan/evaluate replay."""
    out = tmp_path / "roi-model"
    res = CliRunner().invoke(app, _args(folder, out, "--quiet", "--roi", "knee_joint", "--clahe"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"]["roi"] == "knee_joint"
    assert manifest["preprocess"]["clahe"] is True
    assert manifest["preprocess"]["size"] == 48
    assert manifest["extra"]["train_config"]["preprocess"] == {"roi": "knee_joint", "clahe": True}
    assert "--roi knee_joint" in manifest["command"] and "--clahe" in manifest["command"]


def test_cli_train_probe_method_writes_a_loadable_package(folder: Path, tmp_path: Path) -> None:
    """--method probe: frozen backbone + logistic head, stored as an ordinary package."""
    from osteoscan.package import load_package

    out = tmp_path / "probe-model"
    res = CliRunner().invoke(app, _args(folder, out, "--quiet", "--method", "probe"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["train_config"]["method"] == "probe"
    assert "--method probe" in manifest["command"]
    pkg = load_package(out)
    assert len(pkg.members) == len(manifest["members"]) >= 1


def test_make_config_merges_preprocess_over_preset() -> None:
    from osteoscan.train.recipe import PRESETS, make_config

    PRESETS["_t"] = {"preprocess": {"roi": "knee_joint", "clahe": True}}
    try:
        cfg = make_config("_t", preprocess={"clahe": False})
    finally:
        del PRESETS["_t"]
    assert cfg.preprocess == {"roi": "knee_joint", "clahe": False}
    assert make_config("quick").preprocess == {}


@pytest.mark.parametrize(
    "extra",
    [
        ("--roi", "elbow"),
        ("--method", "magic"),
        ("--preset", "nope"),
        ("--positive", "fracture"),
        ("--covariate-columns", "a,b"),
        ("--body-part", "hip"),
        ("--weights", "x.pth"),
        ("--name", "bad name"),
    ],
)
def test_cli_train_usage_errors(folder: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    res = CliRunner().invoke(app, [*_args(folder, tmp_path / "m"), *extra])
    assert res.exit_code != 0
    from osteoscan.errors import UsageError

    assert isinstance(res.exception, UsageError) or res.exit_code == 2


def test_cli_train_help_lists_options() -> None:
    res = CliRunner().invoke(
        app, ["train", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    )
    assert res.exit_code == 0
    for opt in ("--data", "--preset", "--folds", "--target-sensitivity", "--covariate-columns",
                "--roi", "--clahe"):  # fmt: skip
        assert opt in res.output


@pytest.mark.slow
@pytest.mark.skipif(not KNEE.is_dir(), reason="../shared/data/knee-xray not present")
def test_quick_preset_on_knee_xray(tmp_path: Path) -> None:
    """`--preset quick` on the real knee folder: a valid package with the duplicate counts."""
    import time

    out = tmp_path / "knee-quick"
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        app,
        ["train", "--data", str(KNEE), "--out", str(out), "--preset", "quick", "--quiet",
         "--covariates", str(KNEE / "patient_details.csv"),
         "--covariate-columns", "Patient Id,Age,Gender"],
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    td = m["training_data"]
    assert td["n_duplicate_groups"] >= 21 and td["n_conflicting_groups"] >= 7
    assert m["covariates"] == ["age", "sex"]
    assert {"image_only", "covariates_only", "combined"} <= set(m["metrics"])
    assert elapsed < 300  # 3 min budget on 2 idle cores; slack for shared machines


def _knees(root: Path, per_class: int = 10) -> Path:
    for c, (label, density) in enumerate((("normal", 1.0), ("osteoporosis", 0.3))):
        for i in range(per_class):
            img = synthetic_knee(64, seed=70 * c + i, density=density)
            write_png(root / label / f"{label[:3]}{i}.png", img)
    return root


def _truncated_jpeg(path: Path) -> Path:
    """A ~250 KB knee JPEG cut to its first 5 KB (the decoder would show a near-blank image)."""
    import cv2
    import numpy as np

    img = (synthetic_knee(768, seed=5) * 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(-20, 20, img.shape)
    img = np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok and len(buf) > 200_000
    path.write_bytes(buf.tobytes()[:5000])
    return path


def _small_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--arch", "tiny_cnn", "--random-init",
        "--preset", "quick", "--size", "32", "--epochs", "1", "--batch-size", "8", "--folds", "2",
        "--quiet", *extra,
    ]  # fmt: skip


def test_train_refuses_a_class_with_no_readable_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every osteoporosis file unreadable: exit 2 naming the files, even with --allow-unreadable."""
    root = _knees(tmp_path / "d")
    bad = sorted((root / "osteoporosis").iterdir())
    for p in bad:
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature and nothing usable
    code, text = _main(_small_args(root, tmp_path / "m"), capsys)
    assert code == 2 and "10 of 20 files (50%) cannot be read" in text
    assert all(p.name in text for p in bad)
    code, text = _main(_small_args(root, tmp_path / "m", "--allow-unreadable"), capsys)
    assert code == 2 and "osteoporosis has 0" in text and "the split needs 3" in text
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_train_refuses_an_unreadable_share_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 of 20 files unreadable (a truncated JPEG among them) is above 5 %: refused, or allowed."""
    root = _knees(tmp_path / "d", per_class=9)
    _truncated_jpeg(root / "normal" / "cut.jpg")
    (root / "osteoporosis" / "empty.png").write_bytes(b"")
    code, text = _main(_small_args(root, tmp_path / "m"), capsys)
    assert code == 2 and "2 of 20 files (10%)" in text and "--allow-unreadable" in text
    assert "cut.jpg: truncated JPEG" in text and "empty.png" in text
    code, text = _main(_small_args(root, tmp_path / "m", "--allow-unreadable"), capsys)
    assert code == 0, text
    assert "osteoscan train: read 18/20 images usable (2 unreadable, 0 skipped)" in text
    # Piped output: the summary table is never cut ("specifici…") nor padded with spaces.
    assert "specificity" in text and "…" not in text
    assert not [ln for ln in text.splitlines() if ln != ln.rstrip()]
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert m["training_data"]["n_unreadable"] == 2 and m["training_data"]["n_images"] == 18
    assert {r["path"] for r in m["training_data"]["not_used"]} == {
        "normal/cut.jpg", "osteoporosis/empty.png"
    }  # fmt: skip


def test_train_logs_covariate_sources_and_csv_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _knees(tmp_path / "d")
    csv_path = tmp_path / "cov.csv"
    csv_path.write_text("path,age,sex\nnor0,sixty,F\nnor1,-5,M\nnor2,250,X\nost0,70,F\n")
    code, text = _main(_small_args(root, tmp_path / "m", "--covariates", str(csv_path)), capsys)
    assert code == 0, text
    assert "age/sex for 20 images: 0 from DICOM headers, 3 from the covariates CSV, 17 none" in text
    assert "warning: cov.csv: 16 of 20 images have no row" in text
    assert "warning: cov.csv: 4 unusable value(s) ignored (age 'sixty' for nor0" in text


def test_train_help_lists_presets_one_line_each_and_no_type_metavars() -> None:
    from osteoscan.train.recipe import PRESET_HELP, list_presets

    res = CliRunner().invoke(app, ["train", "-h"], env={"COLUMNS": "100"})
    assert res.exit_code == 0
    lines = res.output.splitlines()
    for name in list_presets():
        assert any(name in ln and PRESET_HELP[name] in ln for ln in lines), name
    options = [ln for ln in lines if "--help" not in ln]
    assert not [ln for ln in options if "<bool>" in ln or "<list[" in ln]
