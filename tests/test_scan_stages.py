"""The scan stages as the orchestrator uses them: engine restarts, key checks, one time format,
summaries counting what the results hold, a scan that does not depend on the current folder."""

from __future__ import annotations

import csv
import os
import re
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

try:  # the demo/test generator moves out of the runtime library (osteoscan.testing)
    from osteoscan.testing import synthetic
except ImportError:  # pragma: no cover - before the move
    from osteoscan import synthetic  # type: ignore[no-redef]

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
    assert second.totals == {"rows": 6, "ok": 6, "skipped": 0, "error": 0, "flagged": 6}


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
