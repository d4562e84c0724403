"""The Ray Data engine: the same records and rows as the local engine, dead readers as error rows.

The Ray tests share one local Ray (2 CPUs, loopback only) started by a module fixture and shut
down after; they skip when Ray (the ``distributed`` extra) is not installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from osteoscan.errors import UsageError
from osteoscan.guards import GuardLimits, Watchdog, guarded_read
from osteoscan.load import LoadedFrame, Loader
from osteoscan.preprocess import PreprocessConfig
from osteoscan.scan.batch import FrameBatch
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.engines.local import LocalEngine
from osteoscan.scan.plan import discover_files
from osteoscan.scan.routing import Router
from osteoscan.testing.synthetic import synthetic_knee, write_dicom, write_png

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"

# Ray's single-machine mode (loopback only), read when ray is first imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
try:
    import ray
except ImportError:  # the distributed extra is not installed
    ray = None

# Ray Data's own DataContext copies warn about its deprecated fields
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")
needs_ray = pytest.mark.skipif(
    ray is None, reason='Ray not installed: pip install -e ".[distributed]"'
)


class CrashOn:
    """A reader that kills its own process on one file name, as a segfaulting decoder would."""

    def __init__(self, name: str, inflight_dir: Path) -> None:
        self.name, self.inflight_dir = name, str(inflight_dir)

    def __call__(self, path: str | Path, kind: str | None = None) -> list:
        with Watchdog(self.inflight_dir, None).reading(path):
            if Path(path).name == self.name:
                os._exit(139)
            return guarded_read(path, kind)


class HangOn:
    """A reader that never returns on one file (a decoder stuck in C: no soft limit helps)."""

    def __init__(self, name: str, inflight_dir: Path, hard_seconds: float) -> None:
        self.name, self.inflight_dir, self.hard = name, str(inflight_dir), hard_seconds

    def __call__(self, path: str | Path, kind: str | None = None) -> list:
        with Watchdog(self.inflight_dir, self.hard).reading(path):
            if Path(path).name == self.name:
                time.sleep(3600)
            return guarded_read(path, kind)


def _probe_class() -> type:
    """A reader that reports its worker's thread count instead of reading (RayReader's guards
    set up as for a real file)."""
    import threading

    from osteoscan.guards import error_frame
    from osteoscan.scan.engines.ray_data import RayReader

    class Probe(RayReader):
        def __call__(self, path: str | Path, kind: str | None = None) -> list:
            self._setup()
            return [error_frame(path, f"{os.getpid()} {threading.active_count()}")]

    return Probe


def test_ray_options_without_engine_ray_are_a_usage_error(tmp_path: Path) -> None:
    from osteoscan.errors import UsageError

    for extra in ({"ray_address": "10.0.0.1:6379"}, {"ray_actors": 2}, {"engine": "spark"}):
        cfg = ScanConfig(paths=[tmp_path], out=tmp_path / "r.csv", **extra)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="engine"):
            cfg.validate()


def test_without_ray_the_engine_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from osteoscan.scan.engines import ray_data

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(UsageError, match=r'pip install -e "\.\[distributed\]"') as info:
        ray_data.RayEngine(2, None)
    assert info.value.exit_code == 2


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray for this module: 2 CPUs, loopback only; shut down after."""
    if ray is None:
        pytest.skip('Ray not installed: pip install -e ".[distributed]"')
    from ray import cloudpickle

    # the test readers travel to Ray workers by value (workers cannot import this test module)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo DICOMs and PNGs, synthetic PNG/DICOM knees, a two-frame DICOM, broken files."""
    root = tmp_path_factory.mktemp("ray") / "archive"
    shutil.copytree(DEMO, root / "demo")
    for i in range(4):
        img = synthetic_knee(96, seed=i, density=0.3 + 0.35 * (i % 3))
        (write_png if i % 2 else write_dicom)(root / f"s{i}.{'png' if i % 2 else 'dcm'}", img)
    write_dicom(root / "multi.dcm", np.stack([synthetic_knee(96, seed=99)] * 2))
    (root / "broken.dcm").write_bytes(b"not a dicom at all")
    (root / "empty.png").write_bytes(b"")
    return root


def _files(root: Path, tmp: Path) -> list:
    files, _ = discover_files(ScanConfig(paths=[root], out=tmp / "r.csv"))
    return files


def _loader(keep_display: bool = True) -> Loader:
    return Loader(Router([["knee"]], ["the model"], "knee"), [PreprocessConfig(size=64)],
                  keep_display=keep_display)  # fmt: skip


def _same_record(a: LoadedFrame, b: LoadedFrame) -> None:
    for f in dataclasses.fields(LoadedFrame):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert np.array_equal(x, y), (a.path, f.name)
        else:
            assert x == y, (a.path, f.name, x, y)


def _same_batches(ours: list[FrameBatch], theirs: list[FrameBatch]) -> None:
    assert [b.n_files for b in ours] == [b.n_files for b in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.records) == len(b.records) and a.rows == b.rows
        for ra, rb in zip(a.records, b.records, strict=True):
            _same_record(ra, rb)
        assert a.pixels.keys() == b.pixels.keys()
        assert all(torch.equal(a.pixels[p], b.pixels[p]) for p in a.pixels)


@needs_ray
def test_ray_engine_yields_the_local_engines_batches(
    local_ray: Any, archive: Path, tmp_path: Path
) -> None:
    from osteoscan.scan.engines.ray_data import RayEngine

    files = _files(archive, tmp_path)
    local = list(LocalEngine(torch.device("cpu"), 0, 3, tmp_path / "l").batches(files, _loader()))
    with RayEngine(3, tmp_path / "r", workers=2) as engine:
        ours = list(engine.batches(files, _loader()))
        assert engine.restarts == 0
    _same_batches(ours, local)
    statuses = {r.status for b in ours for r in b.records}
    assert statuses == {"ok", "skipped", "error"}  # the archive exercises every path
    assert sum(len(b.records) for b in ours) == len(files) + 1  # the two-frame DICOM
    assert local_ray.is_initialized()  # the engine leaves a Ray it did not start running


@needs_ray
def test_a_reader_process_crash_is_an_error_record_and_the_rest_complete(
    local_ray: Any, archive: Path, tmp_path: Path
) -> None:
    from osteoscan.scan.engines.ray_data import RayEngine

    files = _files(archive, tmp_path)
    inflight = tmp_path / "inflight"
    with RayEngine(4, inflight, workers=2, read=CrashOn("s1.png", inflight)) as engine:
        records = [r for b in engine.batches(files, _loader(False)) for r in b.records]
        # a second list through the same engine (a scan's heatmap pass): nobody blamed again
        rest = [f for f in files if f.path.name != "s1.png"]
        again = [r for b in engine.batches(rest, _loader(False)) for r in b.records]
    by_path: dict[str, list[LoadedFrame]] = {}
    for r in records:
        by_path.setdefault(Path(r.path).name, []).append(r)
    assert sorted(by_path) == sorted(Path(f.path).name for f in files)  # each file, once
    assert [r.path for r in records] == [str(f.path) for f in files for _ in by_path[f.path.name]]
    crashed = by_path["s1.png"]
    assert len(crashed) == 1 and crashed[0].status == "error"
    assert "crashed" in crashed[0].reason
    local = LocalEngine(torch.device("cpu"), 0, 4, tmp_path / "l")
    expected = {Path(r.path).name: r.status for b in local.batches(files, _loader(False))
                for r in b.records}  # fmt: skip
    assert all(r.status == expected[n] for n, rs in by_path.items() if n != "s1.png" for r in rs)
    assert [(r.path, r.status) for r in again] == [
        (r.path, r.status) for r in records if Path(r.path).name != "s1.png"
    ]


@needs_ray
def test_the_per_file_guards_are_set_up_once_per_worker_process(
    local_ray: Any, archive: Path, tmp_path: Path
) -> None:
    """Ray hands each task a fresh copy of the reader: its watchdog thread must not pile up."""
    from osteoscan.scan.engines.ray_data import RayEngine

    files = [f for f in _files(archive, tmp_path) if f.kind != "broken"][:12]
    probe = _probe_class()(GuardLimits(), tmp_path / "inflight")
    with RayEngine(4, tmp_path / "inflight", workers=2, files_per_task=1, read=probe) as engine:
        reports = [r.reason.split() for b in engine.batches(files, _loader()) for r in b.records]
    threads: dict[str, list[int]] = {}
    for pid, count in reports:
        threads.setdefault(pid, []).append(int(count))
    assert len(reports) == len(files)
    assert all(max(c) - min(c) <= 1 for c in threads.values()), threads


@needs_ray
@pytest.mark.slow  # 11-13 s here: with it the default Ray tests would pass a minute
def test_a_file_that_hangs_in_c_is_an_error_record_after_the_hard_limit(
    local_ray: Any, archive: Path, tmp_path: Path
) -> None:
    from osteoscan.scan.engines.ray_data import RayEngine

    files = [f for f in _files(archive, tmp_path) if f.path.parent == archive]
    inflight = tmp_path / "inflight"
    reader = HangOn("s2.dcm", inflight, hard_seconds=2.0)
    t0 = time.monotonic()
    with RayEngine(2, inflight, GuardLimits(seconds=None), workers=2, read=reader) as engine:
        records = [r for b in engine.batches(files, _loader(False)) for r in b.records]
    assert time.monotonic() - t0 < 120
    hung = [r for r in records if Path(r.path).name == "s2.dcm"]
    assert len(hung) == 1 and hung[0].status == "error" and "hard time limit" in hung[0].reason
    assert {Path(r.path).name for r in records} == {f.path.name for f in files}


@needs_ray
def test_the_actor_pool_scores_the_rows_the_local_path_scores(
    local_ray: Any, archive: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    from osteoscan.manifest import read_manifest
    from osteoscan.scan.engines.ray_cluster import scored_batches
    from osteoscan.scan.engines.ray_data import RayEngine
    from osteoscan.scan.plan import run_key_for
    from osteoscan.scan.score import Scorer, load_models

    pkg = tiny_package()
    cfg = ScanConfig(paths=[archive], out=tmp_path / "r.csv", models=[pkg], body_part="knee",
                     batch_size=3, hdf5=tmp_path / "r.h5")  # fmt: skip
    key = run_key_for(cfg, [read_manifest(pkg)])
    files = _files(archive, tmp_path)
    models = load_models(cfg.models, torch.device("cpu"))
    loader = Loader(Router([m.ensemble.body_parts for m in models], [m.label for m in models],
                           "knee"), [m.preprocess for m in models])  # fmt: skip
    local_scorer = Scorer(cfg, models)
    engine0 = LocalEngine(torch.device("cpu"), 0, 3, tmp_path / "l")
    local = [s for b in engine0.batches(files, loader) for s in local_scorer.score(b)]
    driver = Scorer(cfg, models)
    with RayEngine(3, tmp_path / "r", workers=1) as engine:
        got = list(scored_batches(engine, files, loader, cfg, key, actors=1))
    for batch in got:
        batch.replay(driver.tally)
    ours = [s for b in got for s in b.scored]
    assert [b.n_files for b in got] == [3] * (len(files) // 3) + (
        [len(files) % 3] if len(files) % 3 else []
    )
    assert len(ours) == len(local)
    for a, b in zip(ours, local, strict=True):
        da, db = a.row.as_dict(), b.row.as_dict()
        da.pop("scanned_at"), db.pop("scanned_at")
        assert da == db
        assert a.file_frames == b.file_frames
        for f in ("member_probs", "heatmap", "model_input"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or np.allclose(x, y, atol=1e-6), f
    assert any(s.row.status == "ok" for s in ours)
    assert driver.tally.summary() == local_scorer.tally.summary()


def _scan(cfg: ScanConfig) -> dict[str, Any]:
    """Run the scan; the CSV rows (no ``scanned_at``), flagged rows and HDF5 arrays it wrote."""
    import csv

    from osteoscan.scan.pipeline import run_scan
    from osteoscan.writers import flagged_path_for, read_hdf5

    summary = run_scan(cfg)
    out: dict[str, Any] = {"summary": (summary.counts, summary.rows, summary.covariates)}
    for name, path in (("rows", cfg.out), ("flagged", flagged_path_for(cfg.out))):
        with open(path, newline="") as fh:
            out[name] = [{k: v for k, v in r.items() if k != "scanned_at"}
                         for r in csv.DictReader(fh)]  # fmt: skip
    out["hdf5"] = read_hdf5(cfg.hdf5) if cfg.hdf5 else {}
    out["hdf5"].pop("scanned_at", None)
    out["hdf5"]["attrs"] = {k: v for k, v in out["hdf5"].get("attrs", {}).items()
                            if "time" not in k and "created" not in k}  # fmt: skip
    return out


@needs_ray  # about 10 s here: issue 13's first "done when", so in every CI run
def test_a_scan_through_the_ray_engine_writes_the_local_scans_outputs(
    local_ray: Any,
    archive: Path,
    tiny_package: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """``engine="ray"`` (``--engine ray``): identical CSV, flagged list and HDF5."""

    def cfg_in(folder: str, **kw: Any) -> ScanConfig:
        out = tmp_path / folder
        return ScanConfig(paths=[archive], out=out / "results.csv", models=[tiny_package()],
                          hdf5=out / "results.h5", body_part="knee", batch_size=3,
                          device="cpu", **kw)  # fmt: skip

    local = _scan(cfg_in("local", workers=0))
    ours = _scan(cfg_in("ray", workers=2, engine="ray"))
    assert ours["rows"] == local["rows"] and ours["flagged"] == local["flagged"]
    assert ours["summary"] == local["summary"]
    assert ours["hdf5"].keys() == local["hdf5"].keys()
    for key, value in local["hdf5"].items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(ours["hdf5"][key], value, equal_nan=value.dtype.kind == "f"), key
        else:
            assert ours["hdf5"][key] == value, key
    assert {r["status"] for r in ours["rows"]} == {"ok", "skipped", "error"}


KILLED_DRIVER = """
import os, signal, time
from osteoscan.scan.engines.ray_cluster import RaySession, _stat
def stop(signum, frame):  # the scan's own: stop after the current batch
    pass
signal.signal(signal.SIGTERM, stop)
session = RaySession(num_cpus=1)
assert signal.getsignal(signal.SIGTERM) is stop, "ray.init took over SIGTERM"
ppid = {int(p): int(f[1]) for p in os.listdir("/proc") if p.isdigit() and (f := _stat(p))}
kids, frontier = [], {os.getpid()}
while frontier:  # every descendant: Ray's agents are the raylet's children
    frontier = {p for p, q in ppid.items() if q in frontier}
    kids += frontier
print(" ".join(map(str, kids)), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


@needs_ray
@pytest.mark.slow  # starts its own Ray in a subprocess (about 20 s here)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_local_ray_keeps_the_scans_sigterm_and_nothing_of_it_outlives_a_killed_scan(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)  # fmt: skip
    try:
        assert proc.stdout is not None
        kids = [int(p) for p in proc.stdout.readline().split()]
        assert len(kids) >= 4, "the local Ray's processes were not found"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [k for k in kids if _alive(k)]


# The scan to kill: each committed batch is held for a moment, so that on a fast machine the
# 28-row archive does not finish between two looks at the state database.
RAY_SCAN = """
import sys
import time
from pathlib import Path
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.pipeline import run_scan
from osteoscan.scan.state import ScanState

_record = ScanState.record
def _slow_record(self, results, run_key):
    out = _record(self, results, run_key)
    time.sleep(0.3)
    return out
ScanState.record = _slow_record

arch, out, pkg = map(Path, sys.argv[1:4])
run_scan(ScanConfig(paths=[arch], out=out / "results.csv", models=[pkg], hdf5=out / "results.h5",
                    body_part="knee", batch_size=3, workers=2, device="cpu", engine="ray"))
"""


@needs_ray  # two scans that each start a Ray (about a minute here), in every CI run all the same
def test_a_killed_ray_scan_resumes_to_the_uninterrupted_outputs(
    local_ray: Any,
    archive: Path,
    tiny_package: Callable[..., Path],
    tmp_path: Path,
) -> None:
    import signal
    import sqlite3
    import subprocess

    def cfg_in(out: Path) -> ScanConfig:
        return ScanConfig(paths=[archive], out=out / "results.csv", models=[tiny_package()],
                          hdf5=out / "results.h5", body_part="knee", batch_size=3, workers=0,
                          device="cpu")  # fmt: skip

    reference = _scan(cfg_in(tmp_path / "ref"))
    for trial, at_rows in enumerate((3, 12)):
        out = tmp_path / f"kill{trial}"
        proc = subprocess.Popen([sys.executable, "-c", RAY_SCAN, str(archive), str(out),
                                 str(tiny_package())], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        db, deadline, seen = out / "results.state.sqlite", time.monotonic() + 180, 0
        while proc.poll() is None and time.monotonic() < deadline and seen < at_rows:
            time.sleep(0.05)
            with contextlib.suppress(sqlite3.Error):
                if db.exists():
                    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
                    seen = int(conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
                    conn.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 0 < seen < len(reference["rows"]), f"killed at {seen} rows: not mid-run"
        again = _scan(dataclasses.replace(cfg_in(out), engine="ray", workers=2))  # next night
        assert again["rows"] == reference["rows"] and again["flagged"] == reference["flagged"]
        for key, value in reference["hdf5"].items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                np.testing.assert_allclose(again["hdf5"][key], value, atol=1e-6, err_msg=key)
            elif key != "attrs":
                assert np.array_equal(again["hdf5"][key], value), key


JOIN = """
import sys
from pathlib import Path
from osteoscan.load import Loader
from osteoscan.preprocess import PreprocessConfig
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.engines.ray_data import RayEngine
from osteoscan.scan.plan import discover_files
from osteoscan.scan.routing import Router

files, _ = discover_files(ScanConfig(paths=[Path(sys.argv[2])], out=Path("unused.csv")))
engine = RayEngine(4, Path.cwd() / "inflight", address=sys.argv[1])  # absolute path
loader = Loader(Router([["knee"]], ["the model"], "knee"), [PreprocessConfig(size=64)])
n = sum(b.n_files for b in engine.batches(files, loader))
print(engine.workers, n, len(files))
engine.close()
"""


@needs_ray
@pytest.mark.slow  # a second driver joins the module's Ray (about 20 s here)
def test_with_an_address_the_engine_joins_the_cluster_and_leaves_it_running(
    local_ray: Any, archive: Path, tmp_path: Path
) -> None:
    import subprocess

    address = local_ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", JOIN, address, str(archive)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    workers, n, expected = map(int, proc.stdout.split()[-3:])
    assert workers == 2 and n == expected > 0  # every CPU of the cluster; every file once
    assert local_ray.is_initialized()
    assert local_ray.get(local_ray.remote(lambda: 7).remote()) == 7  # the cluster still serves


def test_the_benchmark_load_options_change_the_cost_of_a_read_not_what_it_reads(
    tmp_path: Path,
) -> None:
    import pickle

    from osteoscan.scan.engines.ray_data import RayReader, busy_work

    path = write_dicom(tmp_path / "k.dcm", synthetic_knee(128, seed=1))
    # read here, in the test process: no address-space cap (it would bind every process this
    # one starts afterwards, e.g. the browser tests' Chromium) and no hard watchdog
    import resource

    limits = GuardLimits(memory_bytes=None, hard_seconds=None)
    cap = resource.getrlimit(resource.RLIMIT_AS)
    plain = RayReader(limits, None)
    heavy = pickle.loads(pickle.dumps(RayReader(limits, None, repeat=2, work=300)))
    assert (heavy.repeat, heavy.work) == (2, 300)  # as a Ray task receives it
    a, b = plain(path, "dicom"), heavy(path, "dicom")
    assert len(a) == len(b) == 1
    assert a[0].status == b[0].status == "ok"
    np.testing.assert_array_equal(a[0].image, b[0].image)
    # fixed work, each round depending on the one before (nothing to skip)
    assert busy_work(300) == busy_work(300) != busy_work(299)
    assert len(busy_work(1)) == 32 and busy_work(0) == b""
    assert resource.getrlimit(resource.RLIMIT_AS) == cap  # this process was left as it was
