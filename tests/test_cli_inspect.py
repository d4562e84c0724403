"""Tests for the `osteoscan inspect` command line (rendering, options, exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from osteoscan.cli import app, main
from osteoscan.errors import UsageError
from osteoscan.testing import synthetic


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    synthetic.write_png(root / "a.png", synthetic.synthetic_knee(32), bits=16)
    synthetic.write_png(root / "sub" / "b.png", synthetic.synthetic_knee(32, seed=1), bits=8)
    (root / "x.dcm").write_text("hello")
    (root / "README.txt").write_text("notes")
    return root


def test_missing_path_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert isinstance(result.exception, UsageError)


def test_json_lines_and_exit_zero_with_broken_files(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["inspect", str(folder), "--json", "--export", str(out), "--size", "48"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "x.dcm"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    for row in rows[:2]:
        img = cv2.imread(row["export"], cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == (48, 48)
    assert "3 frame(s)" in result.stderr and "1 file(s) or folder(s) ignored" in result.stderr


def test_include_exclude(folder: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(folder), "--json", "--include", "*.png"])
    assert [Path(json.loads(x)["path"]).name for x in result.stdout.splitlines()] == [
        "a.png",
        "b.png",
    ]
    result = runner.invoke(
        app, ["inspect", str(folder), "--json", "--include", "*.png", "--exclude", "sub"]
    )
    assert [Path(json.loads(x)["path"]).name for x in result.stdout.splitlines()] == ["a.png"]


def test_table_on_terminal(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(app, ["inspect", ".", "--show-ignored"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[1]
    for column in ("path", "frame", "status", "reason", "kind", "body part", "age", "sex"):
        assert column in header
    for column in ("modality", "photometric", "transfer syntax", "bits", "size"):
        assert column in header
    assert "a.png" in result.stdout and "named .dcm but is not DICOM" in result.stdout
    assert "README.txt: not an image file" in result.stderr
