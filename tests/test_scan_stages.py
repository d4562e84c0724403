"""The scan stages as the orchestrator uses them: engine restarts, key checks, one time format,
summaries counting what the results hold, a scan that does not depend on the current folder."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from osteoscan.errors import OsteoscanError
from osteoscan.guards import Watchdog, guarded_read
from osteoscan.load import Loader
from osteoscan.manifest import read_manifest
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.engines.local import LocalEngine
from osteoscan.scan.pipeline import run_scan
from osteoscan.scan.plan import discover_files, record_orphans, run_key_for
from osteoscan.scan.routing import Router
from osteoscan.scan.state import ScanState
from osteoscan.testing import synthetic

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class CrashOn:
    """A reader that kills its own process on one file name, as a segfaulting decoder would."""

    def __init__(self, name: str, inflight: Path) -> None:
        self.name, self.inflight = name, str(inflight)

    def __call__(self, path: str | Path, kind: str | None = None) -> list:
        with Watchdog(self.inflight, None).reading(path):
            if Path(path).name == self.name:
                os._exit(139)
            return guarded_read(path, kind)


@pytest.fixture
def pngs(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    for i in range(6):
        synthetic.write_png(root / f"k{i}.png", synthetic.synthetic_knee(64, seed=i))
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_reader_process_crash_is_an_error_record_and_loading_goes_on(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    from osteoscan.preprocess import PreprocessConfig

    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv")
    files, _ = discover_files(cfg)
    inflight = tmp_path / "inflight"
    engine = LocalEngine(torch.device("cpu"), 1, 2, inflight, read=CrashOn("k3.png", inflight))
    loader = Loader(Router([["knee"]]), [PreprocessConfig(size=64)])
    records = [r for batch in engine.batches(files, loader) for r in batch.records]
    by_name = {Path(r.path).name: r for r in records}
    assert sorted(by_name) == [f"k{i}.png" for i in range(6)] and len(records) == 6
    assert by_name["k3.png"].status == "error"
    assert "crashed" in by_name["k3.png"].reason
    assert all(r.status == "ok" for n, r in by_name.items() if n != "k3.png")
    assert engine.restarts == 1


def test_a_package_replaced_after_planning_is_refused(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import osteoscan.scan.score as score

    real = score.load_models
    other = tiny_package(seed=1)
    monkeypatch.setattr(score, "load_models", lambda refs, device: real([other], device))
    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0)  # fmt: skip
    with pytest.raises(OsteoscanError, match="changed while this scan was starting"):
        run_scan(cfg)
    assert not (tmp_path / "r.csv").exists()


def test_run_key_depends_on_package_identity_and_row_options(
    tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = ScanConfig(paths=[tmp_path], out=tmp_path / "r.csv")
    a, b = read_manifest(tiny_package()), read_manifest(tiny_package(seed=1))
    assert run_key_for(cfg, [a]) == run_key_for(cfg, [a])
    assert run_key_for(cfg, [a]) != run_key_for(cfg, [b])
    assert run_key_for(cfg, [a]) != run_key_for(ScanConfig([tmp_path], "r.csv", threshold=0.3), [a])


def test_every_scanned_at_has_one_format_including_crash_rows(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, hdf5=tmp_path / "r.h5")  # fmt: skip
    run_scan(cfg)
    # a reader that died on a file in a later run leaves an in-flight log; it becomes a row
    crash = tmp_path / "archive" / "k9.png"
    synthetic.write_png(crash, synthetic.synthetic_knee(64, seed=9))
    inflight = Path(str(tmp_path / "r.state.sqlite") + ".inflight")
    code = "import os, sys\nfrom osteoscan.guards import Watchdog\n"
    code += f"with Watchdog(sys.argv[1], None).reading({str(crash)!r}):\n    os._exit(139)"
    subprocess.run([sys.executable, "-c", code, str(inflight)], timeout=60)
    with ScanState.open(tmp_path / "r.state.sqlite") as st:
        key = run_key_for(cfg, [read_manifest(tiny_package())])
        assert record_orphans(st, inflight, key, reader_died=True) == [str(crash)]
    run_scan(cfg)
    rows = _rows(tmp_path / "r.csv")
    assert len(rows) == 7 and [r["status"] for r in rows].count("error") == 1
    assert all(ISO_Z.match(r["scanned_at"]) for r in rows), {r["scanned_at"] for r in rows}
    from osteoscan.writers import read_hdf5

    assert ISO_Z.match(str(read_hdf5(tmp_path / "r.h5")["attrs"]["created_at"]))


def test_a_rescan_summary_counts_what_the_results_hold(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, threshold=0.0)  # fmt: skip
    first = run_scan(cfg)
    second = run_scan(cfg)
    flagged = sum(r["flagged"] == "true" for r in _rows(tmp_path / "r.csv"))
    assert flagged == 6 and first.counts["flagged"] == 6
    assert second.counts["flagged"] == 0 and second.counts["unchanged"] == 6  # nothing new
    assert second.totals == {"rows": 6, "ok": 6, "skipped": 0, "error": 0, "missing": 0,
                             "flagged": 6}  # fmt: skip


def test_scan_works_from_a_folder_holding_an_osteoscan_directory(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    """Reader workers must not import a stray ``./osteoscan`` (a clone's parent folder)."""
    cwd = tmp_path / "home"
    (cwd / "osteoscan").mkdir(parents=True)
    script = Path(sys.executable).with_name("osteoscan")
    if not script.exists():
        pytest.skip("the osteoscan console script is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = tmp_path / "out" / "r.csv"
    proc = subprocess.run(
        [str(script), "scan", str(pngs), "--out", str(out), "--model", str(tiny_package()),
         "--workers", "1", "--device", "cpu", "--quiet"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["status"] for r in _rows(out)] == ["ok"] * 6


def test_adding_hdf5_then_heatmaps_computes_only_heatmaps(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    from osteoscan.writers import read_hdf5

    def cfg(**options: Path) -> ScanConfig:
        return ScanConfig(
            paths=[pngs],
            out=tmp_path / "r.csv",
            models=[str(tiny_package())],
            device="cpu",
            workers=0,
            threshold=0.0,
            **options,
        )  # type: ignore[arg-type]

    run_scan(cfg())
    before = {r["path"]: r for r in _rows(tmp_path / "r.csv")}
    s = run_scan(cfg(hdf5=tmp_path / "r.h5"))
    assert s.counts["ok"] == 0 and s.counts["unchanged"] == 6  # nothing rescored
    h5 = read_hdf5(tmp_path / "r.h5")
    assert len(h5["path"]) == 6 and all(h5["has_heatmap"])
    s = run_scan(cfg(hdf5=tmp_path / "r.h5", heatmaps_dir=tmp_path / "hm"))
    assert s.counts["ok"] == 0
    after = {r["path"]: r for r in _rows(tmp_path / "r.csv")}
    assert len(list((tmp_path / "hm").glob("*.png"))) == 6
    for path, row in after.items():
        assert row["heatmap"] and Path(row["heatmap"]).exists()
        assert {k: v for k, v in row.items() if k != "heatmap"} == {
            k: v for k, v in before[path].items() if k != "heatmap"
        }  # same scores, same scanned_at
    s = run_scan(cfg(hdf5=tmp_path / "r.h5", heatmaps_dir=tmp_path / "hm"))
    assert s.written == [] and s.device == "none"  # nothing to do, no model loaded


def test_an_unwritable_output_fails_before_the_first_image(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    from osteoscan.errors import OutputError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, hdf5=blocker / "r.h5")  # fmt: skip
    with pytest.raises(OutputError, match="not-a-folder"):
        run_scan(cfg)
    assert not (tmp_path / "r.state.sqlite").exists() or _n_rows(tmp_path / "r.state.sqlite") == 0


def _n_rows(db: Path) -> int:
    with ScanState.open(db) as st:
        return st.n_rows()


def test_redact_paths_writes_pseudonyms_everywhere(
    tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    from osteoscan.writers import read_hdf5

    root = tmp_path / "archive"
    synthetic.write_png(root / "Doe^Jane" / "PHI-123456.png", synthetic.synthetic_knee(64, seed=1))
    (root / "Doe^Jane" / "Smith^John.dcm").write_bytes(b"not a dicom at all" * 10)
    cfg = ScanConfig(paths=[root], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, redact_paths=True,
                     hdf5=tmp_path / "r.h5")  # fmt: skip
    run_scan(cfg)
    text = (tmp_path / "r.csv").read_text() + (tmp_path / "r.flagged.csv").read_text()
    text += " ".join(read_hdf5(tmp_path / "r.h5")["path"])
    for name in ("Doe", "Jane", "PHI-123456", "Smith", "archive"):
        assert name not in text
    rows = _rows(tmp_path / "r.csv")
    assert len(rows) == 2 and all(r["path"].startswith("redacted/") for r in rows)
    first = [r["path"] for r in rows]
    run_scan(cfg)  # stable across runs
    assert [r["path"] for r in _rows(tmp_path / "r.csv")] == first
    cfg.redact_paths = False  # switching it off re-exports real paths without rescoring
    s = run_scan(cfg)
    assert s.counts["ok"] == 0 and "Doe^Jane" in (tmp_path / "r.csv").read_text()


def test_covariates_say_where_they_came_from_and_can_be_required(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    from osteoscan.scan.score import MISSING_COVARIATES

    raw = (synthetic.synthetic_knee(64, seed=3) * 65535).astype("uint16")
    synthetic.write_dicom(pngs / "with_header.dcm", raw, bits_stored=16)  # header: 065Y, F
    (tmp_path / "cov.csv").write_text("path,age,sex\nnobody.png,70,F\nk0.png,sixty,F\n")
    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, body_part="knee",
                     covariates=tmp_path / "cov.csv")  # fmt: skip
    s = run_scan(cfg)
    assert s.covariates == (
        "age/sex for 7 images: 1 from DICOM headers, 1 from the covariates CSV, 5 none"
    )
    assert any("unusable" in w and "sixty" in w for w in s.warnings)
    assert any("6 of 7 images have no row" in w for w in s.warnings)
    cfg = ScanConfig(paths=[pngs], out=tmp_path / "req.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, body_part="knee",
                     require_covariates=True)  # fmt: skip
    run_scan(cfg)
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "req.csv")}
    assert rows["with_header.dcm"]["status"] == "ok" and rows["with_header.dcm"]["p_normal"]
    assert all(rows[f"k{i}.png"]["status"] == "error" for i in range(6))
    assert rows["k0.png"]["reason"] == MISSING_COVARIATES and rows["k0.png"]["p_normal"] == ""


def test_heatmap_png_is_drawn_on_the_radiograph_and_hdf5_records_the_transform(
    tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    import cv2

    from osteoscan.writers import read_hdf5

    root = tmp_path / "archive"
    synthetic.write_png(root / "wide.png", synthetic.synthetic_knee(96, seed=4)[:60])  # 60 x 96
    cfg = ScanConfig(paths=[root], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0, threshold=0.0, hdf5=tmp_path / "r.h5",
                     heatmaps_dir=tmp_path / "hm")  # fmt: skip
    run_scan(cfg)
    (row,) = _rows(tmp_path / "r.csv")
    png = cv2.imread(row["heatmap"])
    assert png.shape == (60, 96, 3)  # the radiograph's shape, not the 64 x 64 model input
    h5 = read_hdf5(tmp_path / "r.h5")
    assert h5["heatmaps"].shape == (1, 64, 64)  # the HDF5 keeps the model-input map
    assert h5["source_shape"].tolist() == [[60, 96]]
    assert h5["crop_box"].tolist() == [[0, 0, 60, 96]]
    assert h5["input_box"].tolist() == [[12, 0, 40, 64]]  # letterboxed: 12 rows of padding


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are dead already
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")
def test_nothing_outlives_a_killed_scan(tiny_package: Callable[..., Path], tmp_path: Path) -> None:
    import signal
    import time

    root = tmp_path / "archive"
    synthetic.write_png(root / "k0000.png", synthetic.synthetic_knee(128, seed=1))
    # Many files of one image, slow enough to be killed mid-run (~300 images/s on 2 cores).
    # Copies, not hard links: the scan reads one path per inode and ignores the other links.
    for i in range(1, 6000):
        shutil.copyfile(root / "k0000.png", root / f"k{i:04d}.png")
    script = Path(sys.executable).with_name("osteoscan")
    if not script.exists():
        pytest.skip("the osteoscan console script is not installed next to this Python")
    proc = subprocess.Popen(
        [str(script), "scan", str(root), "--out", str(tmp_path / "r.csv"), "--model",
         str(tiny_package()), "--workers", "2", "--batch-size", "2", "--device", "cpu", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline, family = time.monotonic() + 180, set()
    # forkserver + 2 workers (+ tracker); a scan that ended early fails below at once
    while time.monotonic() < deadline and len(family) < 3 and proc.poll() is None:
        time.sleep(0.2)
        family = _descendants(proc.pid)
    assert proc.poll() is None and len(family) >= 3, "the scan ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in family):
        time.sleep(0.2)
        family = {p for p in family if _alive(p)}
    assert not family, f"processes of the killed scan still running: {sorted(family)}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_vanished_files_are_marked_missing_then_pruned_and_an_empty_root_changes_nothing(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    from osteoscan.errors import UsageError

    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0)  # fmt: skip
    run_scan(cfg)
    (pngs / "k1.png").unlink()
    (pngs / "k4.png").unlink()
    s = run_scan(cfg)
    assert s.device == "none"  # nothing to score: outputs rewritten without loading a model
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "r.csv")}
    assert {n for n, r in rows.items() if r["status"] == "missing"} == {"k1.png", "k4.png"}
    assert "last scanned" in rows["k1.png"]["reason"] and rows["k1.png"]["p_normal"]
    assert s.totals["missing"] == 2 and s.totals["rows"] == 6
    synthetic.write_png(pngs / "k4.png", synthetic.synthetic_knee(64, seed=4))  # it comes back
    s = run_scan(cfg)
    assert s.counts["ok"] == 1 and _rows(tmp_path / "r.csv")[4]["status"] == "ok"
    cfg.prune = True
    s = run_scan(cfg)
    assert sorted(Path(r["path"]).name for r in _rows(tmp_path / "r.csv")) == [
        "k0.png", "k2.png", "k3.png", "k4.png", "k5.png"]  # fmt: skip
    before = (tmp_path / "r.csv").read_bytes()
    shutil.rmtree(pngs)
    pngs.mkdir()  # an unmounted share: the mount point is there, empty
    with pytest.raises(UsageError, match="is the archive mounted"):
        run_scan(cfg)
    assert (tmp_path / "r.csv").read_bytes() == before


def test_a_rescan_opens_no_unchanged_file(
    pngs: Path, tiny_package: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import osteoscan.discover as discover_module

    cfg = ScanConfig(paths=[pngs], out=tmp_path / "r.csv", models=[str(tiny_package())],
                     device="cpu", workers=0)  # fmt: skip
    run_scan(cfg)
    opened: list[str] = []
    real = discover_module.sniff
    monkeypatch.setattr(discover_module, "sniff", lambda p: opened.append(Path(p).name) or real(p))
    synthetic.write_png(pngs / "new.png", synthetic.synthetic_knee(64, seed=7))
    run_scan(cfg)
    assert opened == ["new.png"]  # the six unchanged files cost a stat each, no read
    opened.clear()
    cfg.threshold = 0.3  # another run key: every file is planned again, and read
    s = run_scan(cfg)
    assert sorted(opened) == sorted(p.name for p in pngs.iterdir()) and s.counts["ok"] == 7
