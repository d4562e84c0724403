"""``osteoscan scan`` through the CLI: exit codes, outputs, quiet log lines, real workers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from osteoscan import synthetic
from osteoscan.cli import app, main
from osteoscan.writers import read_hdf5, result_columns

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_archive")
    for i in range(3):
        synthetic.write_dicom(root / f"d{i}.dcm", synthetic.synthetic_knee(72, seed=i))
        synthetic.write_png(root / "png" / f"p{i}.png", synthetic.synthetic_knee(72, seed=9 + i))
    synthetic.write_dicom(root / "chest.dcm", synthetic.synthetic_chest(64), body_part="CHEST")
    (root / "bad.jpg").write_bytes(b"nope")
    return root


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def test_scan_end_to_end_with_workers(folder: Path, tiny_package, tmp_path: Path) -> None:
    out = tmp_path / "res" / "results.csv"
    cov = tmp_path / "cov.csv"
    cov.write_text("path,age,sex\npng/p0.png,70,F\n")
    args = [
        "scan", str(folder), "--out", str(out), "--hdf5", str(tmp_path / "r.h5"),
        "--heatmaps", str(tmp_path / "hm"), "--heatmaps-for", "all", "--model",
        str(tiny_package()), "--body-part", "knee", "--covariates", str(cov), "--workers", "1",
        "--batch-size", "4", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    header, rows = _rows(out)
    assert header == result_columns(["normal", "osteopenia", "osteoporosis"])
    assert len(rows) == 8
    status = {Path(r["path"]).name: r["status"] for r in rows}
    assert status["chest.dcm"] == "skipped" and status["bad.jpg"] == "error"
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["heatmap"] and Path(r["heatmap"]).is_file() for r in ok)
    assert len(read_hdf5(tmp_path / "r.h5")["heatmaps"]) == 6
    assert (out.parent / "results.flagged.csv").is_file()
    # --quiet: timestamped log lines, no Rich live display.
    lines = [ln for ln in res.output.splitlines() if "osteoscan scan:" in ln]
    assert lines and all(ln[:4].isdigit() and ln[10] == "T" for ln in lines)


def test_no_model_exits_1_with_message(folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OSTEOSCAN_MODELS", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["scan", str(folder), "--out", str(tmp_path / "r.csv"), "--model", "no-such-model"])
    assert exc.value.code == 1
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_usage_errors_exit_2(folder: Path, tiny_package, tmp_path: Path) -> None:
    for extra in (["--heatmaps-for", "some"], ["--covariate-columns", "a,b"]):
        with pytest.raises(SystemExit) as exc:
            main(["scan", str(folder), "--out", str(tmp_path / "r.csv"),
                  "--model", str(tiny_package()), *extra])  # fmt: skip
        assert exc.value.code == 2


def test_error_rows_still_exit_0_and_only_bad_files(tiny_package, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(np.zeros(10, np.uint8).tobytes())
    res = runner.invoke(app, ["scan", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"),
                              "--model", str(tiny_package()), "--workers", "0", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    _, rows = _rows(tmp_path / "r.csv")
    assert [r["status"] for r in rows] == ["error"]
