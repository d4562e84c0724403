"""``osteoscan scan`` through the CLI: exit codes, outputs, quiet log lines, real workers."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from osteoscan.cli import app, main
from osteoscan.rows import result_columns
from osteoscan.testing import synthetic
from osteoscan.writers import read_hdf5

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


def test_missing_archive_is_a_usage_error(tiny_package, tmp_path: Path, capsys) -> None:
    """A crontab pointing at an unmounted share must fail, not write an empty result."""
    with pytest.raises(SystemExit) as exc:
        main(["scan", str(tmp_path / "not-mounted"), "--out", str(tmp_path / "r.csv"),
              "--model", str(tiny_package())])  # fmt: skip
    assert exc.value.code == 2
    assert "not-mounted" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_scan_report_writes_the_review_page_with_thumbnails(
    folder: Path, tiny_package, tmp_path: Path
) -> None:
    html = tmp_path / "page" / "report.html"
    res = runner.invoke(app, ["scan", str(folder), "--out", str(tmp_path / "r.csv"), "--model",
                              str(tiny_package()), "--workers", "0", "--threshold", "0", "-q",
                              "--report", str(html)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"review page: {html}" in res.output
    _, rows = _rows(tmp_path / "r.csv")
    flagged = [r for r in rows if r["flagged"] == "true"]
    page = html.read_text()
    assert flagged and all(r["image_id"] in page for r in flagged)
    # without --heatmaps the PNGs the thumbnails come from go beside the page
    assert all(Path(r["heatmap"]).is_file() and str(html.parent) in r["heatmap"] for r in flagged)


def test_error_rows_still_exit_0_and_only_bad_files(tiny_package, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(np.zeros(10, np.uint8).tobytes())
    res = runner.invoke(app, ["scan", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"),
                              "--model", str(tiny_package()), "--workers", "0", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    _, rows = _rows(tmp_path / "r.csv")
    assert [r["status"] for r in rows] == ["error"]


# Runs the CLI in a fresh interpreter and reports on stderr which heavy libraries it imported.
_PROBE = (
    "import sys\n"
    "from osteoscan.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    heavy = ('torch', 'cv2', 'pydicom', 'sklearn', 'timm', 'h5py')\n"
    "    print('IMPORTED=' + ','.join(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
)


def _probe(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    took = time.perf_counter() - t0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("IMPORTED=")][-1]
    return proc, set(filter(None, line[len("IMPORTED=") :].split(","))), took


def test_rescan_of_unchanged_folder_loads_no_torch(tiny_package, tmp_path: Path) -> None:
    """The nightly no-op: nothing scored, nothing rewritten, no torch/OpenCV/pydicom import."""
    arch = tmp_path / "in"
    synthetic.write_dicom(arch / "d0.dcm", synthetic.synthetic_knee(64, seed=1))
    synthetic.write_png(arch / "p0.png", synthetic.synthetic_knee(64, seed=2))
    out = tmp_path / "out" / "results.csv"
    args = ["scan", str(arch), "--out", str(out), "--model", str(tiny_package()),
            "--hdf5", str(tmp_path / "out" / "r.h5"), "--workers", "0", "--device", "cpu",
            "-q"]  # fmt: skip
    first, heavy1, t1 = _probe(args)
    assert first.returncode == 0, first.stderr
    assert "torch" in heavy1  # the probe does see a real scan's imports
    outputs = [out, tmp_path / "out" / "results.flagged.csv", tmp_path / "out" / "r.h5"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    second, heavy2, t2 = _probe(args)
    assert second.returncode == 0, second.stderr
    assert heavy2 == set(), heavy2
    assert "0 files to scan, 2 unchanged" in second.stderr
    assert "ok=0 skipped=0 error=0 flagged=0 unchanged=2" in second.stderr
    assert "up to date" in second.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs} == before
    assert t2 < t1, (t1, t2)
    # an output that went missing is regenerated from the state, still without rescoring
    flagged = tmp_path / "out" / "results.flagged.csv"
    flagged.unlink()
    third, _, _ = _probe(args)
    assert third.returncode == 0, third.stderr
    assert flagged.is_file() and "done: 0 rows" in third.stderr
    assert out.read_bytes() == before[out][1]
    # --force rescores (new scanned_at: rewritten); the same options without it rewrite nothing
    forced, _, _ = _probe([*args, "--force"])
    assert forced.returncode == 0 and "2 files to scan" in forced.stderr, forced.stderr
    after_force = {p: p.stat().st_mtime_ns for p in outputs}
    again, heavy, _ = _probe(args)
    assert again.returncode == 0 and heavy == set() and "up to date" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in outputs} == after_force
