"""The bundled default model and demo archive: what a new user runs first, offline."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from osteoscan.cli import app
from osteoscan.manifest import DEFAULT_MODEL, read_manifest, resolve_package
from osteoscan.package import verify_package

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo"
runner = CliRunner()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_default_package_is_bundled_intact_and_documented() -> None:
    path = resolve_package(None)
    assert path == REPO / "models" / DEFAULT_MODEL
    verify_package(path)  # every member's sha256 matches the manifest
    manifest = read_manifest(path)
    assert manifest.body_parts == ["knee"] and manifest.positive_classes == ["osteoporosis"]
    assert manifest.training_data["n_duplicate_groups"] >= 21
    assert manifest.training_data["n_conflicting_groups"] >= 7
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 60 * 1024**2
    card = (path / "card.md").read_text()
    for needed in ("NOT FOR CLINICAL USE", "CC BY 4.0", "10.17632/fxjm8fb6mw.2", "ultrasound"):
        assert needed in card
    for variant in ("image_only", "covariates_only", "combined"):
        auc = manifest.metrics[variant]["roc_auc"]  # osteoporosis vs rest
        assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]


def test_default_package_stores_its_one_trunk_once_and_runs_it_once() -> None:
    """Four probe heads on one frozen EfficientNet-Lite0: one trunk file, one trunk run."""
    from osteoscan.ensemble import Ensemble
    from osteoscan.package import load_package

    path = resolve_package(None)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 20 * 1024**2
    manifest = read_manifest(path)
    assert len(manifest.members) == 4
    assert len({m.trunk for m in manifest.members}) == 1 and manifest.members[0].trunk
    assert manifest.training_fingerprints  # kept through the re-save
    # Sharing is decided from the loaded weights, not from the manifest's trunk field.
    assert [g.members for g in Ensemble(load_package(path), "cpu").groups] == [[0, 1, 2, 3]]


def test_quickstart_scans_the_demo_archive_with_the_default_model(tmp_path: Path) -> None:
    demo = tmp_path / "examples"
    shutil.copytree(DEMO, demo / "demo")
    out = tmp_path / "results.csv"
    res = runner.invoke(app, ["scan", str(demo), "--out", str(out), "--quiet", "--workers", "0"])
    assert res.exit_code == 0, res.output
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert len(rows) == 20  # 12 DICOM files + 8 PNGs: one row per image frame found
    knees = [rows[f"knee_00{i}.dcm"] for i in range(1, 9)]
    assert all(r["status"] == "ok" and r["model"].startswith(DEFAULT_MODEL) for r in knees)
    assert all(r["covariates"] == "age,sex" for r in knees)  # from the DICOM headers
    assert rows["chest_001.dcm"]["status"] == "skipped"
    assert "no spine model" in rows["spine_001.dcm"]["reason"]
    assert rows["report_001.dcm"]["status"] == "skipped"
    assert rows["truncated_001.dcm"]["status"] == "error"
    # PNGs state no body part: with only a knee model loaded, --body-part auto scores them as knee.
    pngs = [rows[f"knee_00{i}.png"] for i in range(1, 9)]
    assert all(r["status"] == "ok" and r["body_part"] == "knee" for r in pngs)
    assert all(r["covariates"] == "" for r in pngs)  # no --covariates: image only, and it says so
    text = out.read_text()
    assert "DEMO^PATIENT" not in text and "DEMO-0001" not in text


def test_demo_pngs_with_covariates_score_like_their_dicoms(tmp_path: Path) -> None:
    out = tmp_path / "png.csv"
    args = ["scan", str(DEMO / "png"), "--out", str(out), "--quiet", "--workers", "0"]
    args += ["--body-part", "knee", "--covariates", str(DEMO / "png" / "covariates.csv")]
    assert runner.invoke(app, args).exit_code == 0
    dicom_out = tmp_path / "dcm.csv"
    args = ["scan", str(DEMO / "dicom"), "--out", str(dicom_out), "--quiet", "--workers", "0"]
    assert runner.invoke(app, args).exit_code == 0
    png = {Path(r["path"]).stem: r for r in _rows(out)}
    dcm = {Path(r["path"]).stem: r for r in _rows(dicom_out) if r["status"] == "ok"}
    assert len(png) == 8 and all(r["covariates"] == "age,sex" for r in png.values())
    for stem, row in dcm.items():
        # Same anatomy and covariates; the DICOMs store 12 bits, the PNGs 16: scores agree closely.
        assert float(row["score"]) == pytest.approx(float(png[stem]["score"]), abs=0.02)
