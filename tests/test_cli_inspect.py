"""Tests for the `osteoscan inspect` command line (rendering, options, exit codes)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from osteoscan.cli import app, main
from osteoscan.cli.inspect import COLUMNS, _table
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


def test_plain_lines_when_not_a_terminal(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs and pipes get one tab-separated line per frame, never cut at the console width."""
    deep = folder / ("very_long_folder_name_" * 6) / ("and_a_long_file_name_" * 4 + ".png")
    synthetic.write_png(deep, synthetic.synthetic_knee(32, seed=2), bits=8)
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(app, ["inspect", ".", "--show-ignored"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert len(lines) == 1 + 4  # header + one line per frame
    by_name = {Path(line.split("\t")[0]).name: line.split("\t") for line in lines[1:]}
    assert str(deep.relative_to(folder)) in result.stdout  # the whole path, uncut
    cells = dict(zip(COLUMNS, by_name["a.png"], strict=True))
    assert cells["status"] == "ok" and cells["gate"] == "content_passed"
    assert cells["reason"].startswith("content check passed")  # why the gate let it through
    assert by_name["x.dcm"][4].startswith("named .dcm but is not DICOM")
    assert "README.txt: not an image file" in result.stderr


def test_terminal_table_one_line_per_frame(folder: Path) -> None:
    from osteoscan.inspect import inspect_paths

    rows = list(inspect_paths([folder]))
    buf = io.StringIO()
    Console(file=buf, width=80, force_terminal=True, color_system=None).print(_table(rows))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 + len(rows) and all(len(line) <= 80 for line in lines)
    for column in ("path", "frame", "status", "reason", "body part", "modality", "size"):
        assert column in lines[0]
    assert [line.split()[2] for line in lines[1:]] == [r["status"] for r in rows]


def test_json_carries_the_gate_decision(tmp_path: Path, pydicom_data) -> None:
    """inspect shows the scan's decision: an ultrasound frame is skipped, a radiograph is not."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "us.dcm").symlink_to(pydicom_data("US1_UNCR"))
    (root / "cr.dcm").symlink_to(pydicom_data("RG3_UNCR"))
    result = CliRunner().invoke(app, ["inspect", str(root), "--json"])
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["us.dcm"]["status"] == "skipped" and rows["us.dcm"]["gate"] == "modality"
    assert rows["us.dcm"]["reason"] == rows["us.dcm"]["gate_reason"]
    assert rows["us.dcm"]["reason"].startswith("ultrasound image (Modality=US)")
    assert rows["cr.dcm"]["status"] == "ok" and rows["cr.dcm"]["gate"] == "radiograph"
    assert rows["cr.dcm"]["gate_reason"] == "projection radiograph (Modality=CR)"
