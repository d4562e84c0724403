"""Does the Ray engine's load stage scale with its workers? And what does each stage cost here?

    python benchmarks/ray_scaling.py [--n 96] [--size 1024] [--file-s 0.6] [--load work]
                                     [--trials 2] [--json]

Builds N synthetic knee DICOMs (``--size`` px, uncompressed 12-bit) in a temporary folder, then:

1. stage rates on one core, in this process: the load stage (guarded read + gate + route +
   preprocess) per file, and the default model's scoring (ensemble, CPU) per image;
2. the scaling run: a local Ray with 2 CPUs; the decode made artificially heavy so that one file
   costs about ``--file-s`` seconds (default 0.6 s: a 3.6-megapixel JPEG 2000 radiograph, the
   files the Ray engine is for). ``--load work`` (default) adds pure computation to each read
   (:data:`~osteoscan.scan.engines.ray_data.DECODE_WORK_ENV`), as entropy and wavelet decoding
   is; ``--load reread`` reads each file k times
   (:data:`~osteoscan.scan.engines.ray_data.DECODE_REPEAT_ENV`), which is mostly memory
   traffic. The same files go through :class:`~osteoscan.scan.engines.ray_data.RayEngine` with
   1 and with 2 workers, alternately, ``--trials`` times each; the best time of each counts
   (neighbours on a shared machine only ever slow a trial down). Reports files/s, the ratio
   2 workers / 1 worker, and the CPU time the workers got (cores used, files a CPU-second);
3. the machine's own ceiling for the same load: the Ray task's per-file work (same loader, same
   reader) in a plain ``multiprocessing`` pool of 1 and of 2 processes, no Ray (what two
   processes get from two cores of this host).

Ray workers are warmed up first (their imports are not decode time). Run it on a quiet machine:
``uptime``'s load is printed with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def build(root: Path, n: int, size: int) -> list[Any]:
    """``n`` synthetic knee DICOMs (a few distinct images, copied); their discovered files."""
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.plan import discover_files
    from osteoscan.testing.synthetic import synthetic_knee, write_dicom

    for i in range(n):
        write_dicom(root / f"k{i:04d}.dcm", synthetic_knee(size, seed=i % 4),
                    sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}")  # fmt: skip
    files, _ = discover_files(ScanConfig(paths=[root], out=root.parent / "r.csv"))
    return files


def loader_for(models: list[Any]) -> Any:
    from osteoscan.load import Loader
    from osteoscan.scan.routing import Router

    router = Router([m.ensemble.body_parts for m in models], [m.label for m in models], "knee")
    return Loader(router, [m.preprocess for m in models])


def stage_rates(files: list[Any], models: list[Any]) -> dict[str, float]:
    """Seconds a file for the load stage, seconds an image for scoring (one core each)."""
    import torch

    from osteoscan.scan.batch import collate_frames
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.score import Scorer

    torch.set_num_threads(1)
    loader = loader_for(models)
    sample = files[: min(8, len(files))]
    loader(sample[0].path, sample[0].kind, sample[0].root)  # warm caches
    t0 = time.perf_counter()
    loaded = [loader(f.path, f.kind, f.root) for f in sample]
    load_s = (time.perf_counter() - t0) / len(sample)
    scorer = Scorer(ScanConfig(paths=[], out=Path("unused.csv"), batch_size=8), models)
    batch = collate_frames(loaded)
    scorer.score(collate_frames([loader(f.path, f.kind, f.root) for f in sample[:2]]))  # warm
    t0 = time.perf_counter()
    scored = scorer.score(batch)
    score_s = (time.perf_counter() - t0) / len(batch.records)
    return {"load_s_per_file": load_s, "score_s_per_image": score_s,
            "record_s_per_row": record_rate(scored)}  # fmt: skip


def record_rate(scored: list[Any]) -> float:
    """Seconds a row for the driver's record stage (one SQLite transaction a batch of 32)."""
    import copy

    from osteoscan.scan.record import record_batch
    from osteoscan.scan.state import ScanState

    with tempfile.TemporaryDirectory() as tmp:
        state = ScanState.open(Path(tmp) / "s.sqlite")
        rows = []
        for k in range(256):  # distinct paths: a fresh row each
            for item in scored:
                one = copy.copy(item)
                one.row = copy.copy(item.row)
                one.row.path = f"{item.row.path}.{k}"
                rows.append(one)
        t0 = time.perf_counter()
        for i in range(0, len(rows), 32):
            record_batch(state, rows[i : i + 32], "bench", keep_heatmaps=False, include_phi=False)
        wall = time.perf_counter() - t0
        state.close()
    return wall / len(rows)


def calibrate(files: list[Any], target_s: float, load: str) -> tuple[int, int]:
    """``(repeat, work)`` for a read of one file to cost about ``target_s`` seconds on one core:
    ``reread`` repeats the read, ``work`` adds rounds of pure computation to one read."""
    from osteoscan.guards import guarded_read
    from osteoscan.scan.engines.ray_data import busy_work

    f = files[0]
    guarded_read(f.path, f.kind)
    t0 = time.perf_counter()
    for _ in range(3):
        guarded_read(f.path, f.kind)
    one = (time.perf_counter() - t0) / 3
    if load == "reread":
        return max(1, round(target_s / one)), 0
    busy_work(200)
    t0 = time.perf_counter()
    busy_work(2000)
    per_round = (time.perf_counter() - t0) / 2000
    return 1, max(0, round((target_s - one) / per_round))


def _pool_load(job: tuple[list[Any], Any]) -> int:
    """The Ray task's per-file work (:func:`~osteoscan.scan.engines.ray_data.load_file` with the
    same loader and reader), without Ray: a plain process pool's share of the files."""
    from osteoscan.runtime import worker_init
    from osteoscan.scan.engines.ray_data import load_file

    files, loader = job
    worker_init()
    return sum(len(load_file(f, loader)) for f in files)


def machine_ceiling(
    files: list[Any], loader: Any, load: tuple[int, int], trials: int
) -> dict[str, Any]:
    """Best wall time of the same loads in a plain process pool of 1 and of 2 (no Ray)."""
    import dataclasses
    import multiprocessing

    from osteoscan.guards import GuardLimits
    from osteoscan.scan.engines.ray_data import RayReader

    heavy = dataclasses.replace(loader, read=RayReader(GuardLimits(), None, *load))
    best: dict[int, float] = {}
    ctx = multiprocessing.get_context("spawn")
    for _ in range(trials):
        for procs in (1, 2):
            with ctx.Pool(procs) as pool:
                pool.map(_pool_load, [(files[:1], loader)] * procs)  # imports, worker_init
                t0 = time.perf_counter()
                pool.map(_pool_load, [(files[i::procs], heavy) for i in range(procs)])
                wall = time.perf_counter() - t0
            best[procs] = min(best.get(procs, wall), wall)
    rate = {p: len(files) / wall for p, wall in best.items()}
    return {"files_per_s": rate, "ratio_2_over_1": rate[2] / rate[1]}


def _cpu_by_name() -> dict[str, float]:
    """CPU seconds used so far by this process (``driver``) and each kind of its descendants
    (by process name: Ray's workers are ``ray::…``), from ``/proc`` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[bytes]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                raw = Path(f"/proc/{entry}/stat").read_bytes()
                stats[int(entry)] = raw.rsplit(b")", 1)[1].split()
    mine, frontier = [], {os.getpid()}
    while frontier:
        frontier = {pid for pid, f in stats.items() if int(f[1]) in frontier}
        mine += sorted(frontier)
    me = stats.get(os.getpid(), [b"0"] * 13)
    out = {"driver": (int(me[11]) + int(me[12])) / tick}
    for pid in mine:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        kind = "ray workers" if name.startswith("ray::") else name
        out[kind] = out.get(kind, 0.0) + (int(stats[pid][11]) + int(stats[pid][12])) / tick
    return out


def _workers_cpu_s() -> float:
    """CPU seconds used so far by this process's Ray workers (processes named ``ray::…``)."""
    return _cpu_by_name().get("ray workers", 0.0)


def scaling(
    files: list[Any],
    loader: Any,
    load: tuple[int, int],
    trials: int,
    tmp: Path,
    per_task: int = 2,
) -> dict[str, Any]:
    """Best wall time over ``trials`` of the Ray load stage with 1 and with 2 workers, each file
    read ``repeat`` times with ``work`` rounds of computation (``load``: what
    ``OSTEOSCAN_RAY_DECODE_REPEAT`` / ``OSTEOSCAN_RAY_DECODE_WORK`` set for a scan), and the CPU
    time the workers got meanwhile (on a shared machine: how many cores they actually had)."""
    from osteoscan.scan.engines.ray_cluster import RaySession
    from osteoscan.scan.engines.ray_data import RayEngine

    session = RaySession(num_cpus=2)  # a local Ray as a scan starts it: loopback, 2 CPUs
    try:
        engine = RayEngine(8, tmp / "inflight", workers=2, session=session,
                           files_per_task=per_task)  # fmt: skip
        engine.read.repeat, engine.read.work = load
        # both workers import the reader stack: tasks long enough that the second one is used
        list(engine.batches(files[:8], loader))
        best: dict[int, tuple[float, float]] = {}
        for _ in range(trials):
            for workers in (1, 2):
                engine.workers = workers
                t0, c0 = time.perf_counter(), _workers_cpu_s()
                n = sum(b.n_files for b in engine.batches(files, loader))
                wall, cpu = time.perf_counter() - t0, _workers_cpu_s() - c0
                assert n == len(files)
                if workers not in best or wall < best[workers][0]:
                    best[workers] = (wall, cpu)
        engine.read.repeat, engine.read.work, engine.workers = 1, 0, 1  # the engine's own cost
        t0 = time.perf_counter()
        sum(b.n_files for b in engine.batches(files, loader))
        plain_s = (time.perf_counter() - t0) / len(files)
        engine.close()
    finally:
        session.close()
    rate = {w: len(files) / wall for w, (wall, _) in best.items()}
    return {"best_s": {w: wall for w, (wall, _) in best.items()}, "files_per_s": rate,
            "ratio_2_over_1": rate[2] / rate[1],
            "cores_used": {w: cpu / wall for w, (wall, cpu) in best.items()},
            "files_per_cpu_s": {w: len(files) / cpu for w, (_, cpu) in best.items()},
            "ray_1_worker_s_per_file": plain_s}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="files in the archive")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--file-s", type=float, default=0.6, help="target decode seconds a file")
    ap.add_argument(
        "--load",
        choices=("work", "reread"),
        default="work",
        help="how the decode is made heavy: computation, or re-reading the file",
    )
    ap.add_argument("--trials", type=int, default=2, help="trials per worker count")
    ap.add_argument("--files-per-task", type=int, default=2, help="files a Ray task reads")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    import torch

    from osteoscan.scan.score import load_models

    tmp = Path(tempfile.mkdtemp(prefix="osteoscan-ray-bench-"))
    try:
        files = build(tmp / "archive", args.n, args.size)
        models = load_models([], torch.device("cpu"))
        rates = stage_rates(files, models)
        repeat, work = calibrate(files, args.file_s, args.load)
        loader = loader_for(models)
        result = scaling(files, loader, (repeat, work), args.trials, tmp, args.files_per_task)
        ceiling = machine_ceiling(files, loader, (repeat, work), args.trials)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"files": args.n, "size": args.size, "load": args.load, "decode_repeat": repeat,
           "decode_work": work, **rates, **result, "machine_ceiling": ceiling,
           "loadavg": os.getloadavg(), "cpus": os.cpu_count()}  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"load stage, one core: {rates['load_s_per_file'] * 1000:.0f} ms a file "
          f"({args.size} px DICOM); default model on CPU: "
          f"{rates['score_s_per_image'] * 1000:.0f} ms an image")  # fmt: skip
    print(f"driver record stage: {rates['record_s_per_row'] * 1000:.2f} ms a row; "
          f"Ray load stage without repeat, 1 worker: "
          f"{result['ray_1_worker_s_per_file'] * 1000:.0f} ms a file")  # fmt: skip
    how = f"read {repeat}x" if args.load == "reread" else f"read once + {work} rounds of work"
    print(f"scaling run: {args.n} files, each {how} (~{args.file_s:g} s of decode), "
          f"{args.files_per_task} a task")  # fmt: skip
    for w in (1, 2):
        print(f"  {w} worker(s): best {result['best_s'][w]:.2f} s = "
              f"{result['files_per_s'][w]:.2f} files/s; the workers had "
              f"{result['cores_used'][w]:.2f} cores, "
              f"{result['files_per_cpu_s'][w]:.2f} files a CPU-second")  # fmt: skip
    print(f"  2 workers / 1 worker: {result['ratio_2_over_1']:.2f}x")
    print(f"the same reads without Ray (a process pool): 1 process "
          f"{ceiling['files_per_s'][1]:.2f} files/s, 2 processes "
          f"{ceiling['files_per_s'][2]:.2f} files/s: {ceiling['ratio_2_over_1']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
