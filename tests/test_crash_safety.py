"""Nightly robustness end to end: kill-and-rerun, unchanged reruns, concurrent runs, full disks.

Each scan here is a real ``python -m osteoscan scan`` subprocess (or ``run_scan``) over a small
synthetic archive with a tiny model package: SIGKILL at random moments of the scanning and
writing phases, then a rerun, must give exactly the rows of an uninterrupted scan.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from osteoscan.errors import LockHeldError, OutputError
from osteoscan.testing.synthetic import synthetic_knee, write_dicom, write_png

N_FILES = 24


def make_archive(root: Path, n: int = N_FILES, size: int = 96) -> Path:
    """DICOM and PNG knees, a two-frame DICOM and a broken file."""
    arch = root / "archive"
    for i in range(n):
        img = synthetic_knee(size, seed=i, density=0.3 + 0.35 * (i % 3))
        if i % 2:
            write_png(arch / f"p{i:03d}.png", img)
        else:
            write_dicom(arch / f"d{i:03d}.dcm", img)
    write_dicom(arch / "multi.dcm", np.stack([synthetic_knee(size, seed=99)] * 2))
    (arch / "broken.dcm").write_bytes(b"not a dicom at all")
    return arch


def scan_cmd(arch: Path, out: Path, pkg: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "osteoscan", "scan", str(arch), "--out", str(out / "results.csv"),
        "--model", str(pkg), "--hdf5", str(out / "results.h5"), "--heatmaps", str(out / "hm"),
        "--heatmaps-for", "all", "--body-part", "knee", "--batch-size", "2", "--workers", "0",
        "--device", "cpu", "-q", *extra,
    ]  # fmt: skip


def run_cli(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def run_in_process(cmd: list[str]) -> subprocess.CompletedProcess:
    """The same command through ``osteoscan.cli.main`` in this process (no torch import cost)."""
    import contextlib
    import io

    from osteoscan.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(cmd[3:])  # drop "python -m osteoscan"
        except SystemExit as exc:
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows without ``scanned_at`` (different runs score at different times); heatmap by name."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r.pop("scanned_at")
        r["heatmap"] = Path(r["heatmap"]).name if r["heatmap"] else ""
    return rows


def h5_summary(path: Path) -> tuple[list[str], np.ndarray]:
    from osteoscan.writers import read_hdf5

    data = read_hdf5(path)
    return list(data["path"]), np.asarray(data["score"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_package) -> dict:
    root = tmp_path_factory.mktemp("nightly")
    arch = make_archive(root)
    pkg = tiny_package(size=32, members=2)
    ref = root / "ref"
    proc = run_in_process(scan_cmd(arch, ref, pkg))
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "arch": arch, "pkg": pkg, "ref": ref}


def _rows_in_state(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


def kill_when(proc: subprocess.Popen, db: Path, rows: int, delay: float) -> int:
    """SIGKILL ``proc`` ``delay`` seconds after the state ``db`` holds ``rows`` rows (or after
    it exits / two minutes); returns the rows seen last."""
    seen = -1
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        seen = _rows_in_state(db) if db.exists() else -1
        if seen >= rows:
            break
        time.sleep(0.003)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return seen


def kill_and_rerun(setup: dict, out: Path, rng: random.Random, workers: str = "0") -> int:
    """SIGKILL a scan once it has recorded a random number of rows (+ a random delay), check
    the outputs left behind, rerun, compare with the uninterrupted reference. Returns rows seen
    at the kill."""
    cmd = scan_cmd(setup["arch"], out, setup["pkg"])
    cmd[cmd.index("--workers") + 1] = workers
    target = rng.randint(0, N_FILES + 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = kill_when(proc, out / "results.state.sqlite", target, rng.uniform(0, 0.25))
    # whatever is on disk now is a complete, readable earlier version (or nothing)
    if (out / "results.csv").exists():
        rows = read_rows(out / "results.csv")
        assert len({(r["path"], r["frame"]) for r in rows}) == len(rows)
    if (out / "results.h5").exists():
        h5_summary(out / "results.h5")
    again = run_in_process(cmd)  # the next night's run (in-process: no start-up cost)
    assert again.returncode == 0, again.stderr
    assert read_rows(out / "results.csv") == read_rows(setup["ref"] / "results.csv")
    assert read_rows(out / "results.flagged.csv") == read_rows(setup["ref"] / "results.flagged.csv")
    paths, scores = h5_summary(out / "results.h5")
    ref_paths, ref_scores = h5_summary(setup["ref"] / "results.h5")
    assert paths == ref_paths
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert sorted(p.name for p in (out / "hm").iterdir()) == sorted(
        p.name for p in (setup["ref"] / "hm").iterdir()
    )
    return seen


def test_reference_scan_has_every_frame(setup: dict) -> None:
    rows = read_rows(setup["ref"] / "results.csv")
    assert len(rows) == N_FILES + 3  # + 2 frames of multi.dcm + broken.dcm
    assert [(r["path"], r["frame"]) for r in rows] == sorted((r["path"], r["frame"]) for r in rows)
    assert {r["status"] for r in rows} == {"ok", "error"}


def test_kill_and_rerun_gives_the_uninterrupted_rows(setup: dict) -> None:
    rng = random.Random(1234)
    for trial in range(2):
        kill_and_rerun(setup, setup["root"] / f"kill{trial}", rng)


@pytest.mark.slow
def test_kill_and_rerun_many_trials(setup: dict) -> None:
    rng = random.Random(987)
    seen = [
        kill_and_rerun(setup, setup["root"] / f"slowkill{t}", rng, workers=str(t % 3))
        for t in range(20)
    ]
    assert len(set(seen)) > 5  # kills landed at many different moments


def test_second_run_over_unchanged_archive_scores_nothing(setup: dict, tmp_path: Path) -> None:
    from osteoscan.scan.pipeline import ScanConfig, run_scan

    root = tmp_path
    arch = make_archive(root, n=48, size=192)
    cfg = ScanConfig(
        paths=[arch], out=root / "out" / "results.csv", hdf5=root / "out" / "r.h5",
        models=[setup["pkg"]], device="cpu", batch_size=8, workers=0, body_part="knee",
    )  # fmt: skip
    t0 = time.perf_counter()
    first = run_scan(cfg)
    t_first = time.perf_counter() - t0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "out").iterdir() if p.is_file()}
    t0 = time.perf_counter()
    second = run_scan(cfg)
    t_second = time.perf_counter() - t0
    assert first.rows == 48 + 3 and second.rows == 0
    assert second.counts["unchanged"] == 48 + 2
    for name in ("results.csv", "results.flagged.csv", "r.h5"):  # nothing rewritten
        assert (root / "out" / name).stat().st_mtime_ns == mtimes[name]
    assert t_second < 0.10 * t_first, (t_first, t_second)
    # a changed file and a new file are scanned, nothing else
    write_png(arch / "p001.png", synthetic_knee(192, seed=500))
    write_png(arch / "new.png", synthetic_knee(192, seed=501))
    third = run_scan(cfg)
    assert third.rows == 2 and third.counts["unchanged"] == 48 + 2 - 1
    with open(cfg.out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 48 + 3 + 1
    assert run_scan(ScanConfig(**{**cfg.__dict__, "force": True})).rows == 48 + 4


_HOLD = textwrap.dedent(
    """
    import sys, time
    from osteoscan.scan.lock import ScanLock, lock_path_for
    lock = ScanLock(lock_path_for(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_concurrent_scan_exits_1_naming_the_running_pid(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out / "results.state.sqlite")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        proc = run_in_process(scan_cmd(setup["arch"], out, setup["pkg"]))
        took = time.monotonic() - t0
        assert proc.returncode == 1
        assert f"PID {holder.pid}" in proc.stderr and "running since" in proc.stderr
        assert not (out / "results.csv").exists()
        assert took < 5  # refused at once, before models load
    finally:
        holder.kill()
        holder.wait()
    # (taking over the lock of a dead holder: tests/test_lock.py)


def test_lock_is_checked_before_models_load(setup: dict, tmp_path: Path) -> None:
    from osteoscan.scan.lock import ScanLock, lock_path_for
    from osteoscan.scan.pipeline import ScanConfig, run_scan

    cfg = ScanConfig(paths=[setup["arch"]], out=tmp_path / "r.csv", models=["/nonexistent"])
    with ScanLock(lock_path_for(tmp_path / "r.state.sqlite")), pytest.raises(LockHeldError):
        run_scan(cfg)


def test_disk_full_during_export_is_exit_1_and_keeps_earlier_results(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from osteoscan.scan.pipeline import ScanConfig, run_scan

    arch = make_archive(tmp_path, n=4, size=64)
    cfg = ScanConfig(
        paths=[arch], out=tmp_path / "out" / "results.csv", models=[setup["pkg"]], device="cpu",
        batch_size=2, workers=0, body_part="knee",
    )  # fmt: skip
    run_scan(cfg)
    before = cfg.out.read_bytes()
    write_png(arch / "late.png", synthetic_knee(64, seed=77))
    real_replace, real_write = os.replace, os.write

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # a whole rewrite
    monkeypatch.setattr(os, "write", full)  # an append in place
    with pytest.raises(OutputError, match="No space left|disk is full"):
        run_scan(cfg)
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "write", real_write)
    # earlier results intact (an append may have left a partial tail: cut on the next run)
    assert cfg.out.read_bytes().startswith(before)
    assert not [p for p in cfg.out.parent.iterdir() if p.name.endswith(".tmp")]
    assert not [p for p in cfg.out.parent.iterdir() if p.name.endswith(".tmp")]
    again = run_scan(cfg)  # space is back: the recorded row is exported, nothing rescanned
    assert again.rows == 0
    assert "late.png" in cfg.out.read_text()


def test_cli_full_disk_exit_code(setup: dict, tmp_path: Path) -> None:
    """Unwritable output folder → exit 1 with a clear message (read-only bind of a file)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")  # --out inside a *file* cannot be created: ENOTDIR
    proc = run_in_process(scan_cmd(setup["arch"], blocker / "out", setup["pkg"]))
    assert proc.returncode == 1, proc.stderr
    assert "osteoscan: error:" in proc.stderr and "Traceback" not in proc.stderr
