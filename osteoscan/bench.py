"""``osteoscan bench``: stage-by-stage throughput in one run, and which stage limits a scan.

Stages, each measured alone, then together:

1. ``read_ips_per_worker``: read + preprocess in this process (one worker's worth);
   ``read_ips``: the same through the DataLoader with all scan workers.
2. ``model_ips``: ensemble scoring only, on ready uint16 tensors at the scan batch size.
3. ``model_heatmap_ips``: the same with a Grad-CAM heatmap for every row.
4. ``end_to_end_ips``: a real :func:`run_scan` (discover → workers → model → CSV) of the files.

``limiting_stage`` is the slower of read and model (the two that run in parallel in a scan);
``end_to_end_vs_limiting`` should be close to 1 when workers and model share the cores well.
Without paths, knee radiograph JPEGs (synthetic, ``image_size`` px) are generated in a temp dir.
Thread settings are those of a scan (:func:`osteoscan.runtime.configure_cpu`). ``trunk_graph``
says whether the model ran its trunk as the frozen CPU graph (:mod:`osteoscan.fastpath`), as a
scan of that package on that device does.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from osteoscan.errors import UsageError
from osteoscan.load import Loader
from osteoscan.runtime import configure_allocator, configure_cpu, select_device
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.engines.local import ScanDataset, make_loader
from osteoscan.scan.pipeline import run_scan
from osteoscan.scan.plan import discover_files
from osteoscan.scan.routing import Router
from osteoscan.scan.score import LoadedModel, load_models


def make_synthetic_jpegs(folder: Path, n: int, size: int = 1024, distinct: int = 4) -> list[Path]:
    """Write ``n`` knee JPEGs of ``size`` px (``distinct`` different images, cycled)."""
    from osteoscan.testing.synthetic import synthetic_knee

    folder.mkdir(parents=True, exist_ok=True)
    encoded = []
    for seed in range(min(n, distinct)):
        img = synthetic_knee(size, seed=seed, density=0.4 + 0.2 * seed)
        ok, buf = cv2.imencode(".jpg", np.round(img * 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, 92])  # fmt: skip
        if not ok:
            raise RuntimeError("could not encode a synthetic JPEG")
        encoded.append(buf.tobytes())
    paths = []
    for i, data in zip(range(n), itertools.cycle(encoded)):
        p = folder / f"knee_{i:05d}.jpg"
        p.write_bytes(data)
        paths.append(p)
    return paths


def _arch_package(folder: Path, arch: str, size: int) -> Path:
    """A package of one randomly initialised ``arch`` member (timing needs no training)."""
    from osteoscan.archs import create_model
    from osteoscan.package import Manifest, MemberSpec, save_package

    torch.manual_seed(0)
    man = Manifest(
        name=f"bench-{arch}", version="0", classes=["normal", "osteopenia", "osteoporosis"],
        positive_classes=["osteopenia", "osteoporosis"], threshold=0.5, body_parts=["knee"],
        preprocess={"size": size}, members=[MemberSpec.for_arch(arch, input_size=size)],
    )  # fmt: skip
    return save_package(folder / f"bench-{arch}", man, [create_model(arch, 3)])


def _timed(fn: Callable[[], int], min_seconds: float, min_calls: int = 2) -> float:
    """Items per second of repeated ``fn()`` (returns items done), after one warm-up call."""
    fn()
    n, calls, t0 = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        n += fn()
        calls += 1
    return n / (time.perf_counter() - t0)


class _SteadyClock:
    """Scan event sink measuring rows/s from the first batch on (worker start-up excluded:
    it is paid once per run, not per image, and would dominate a short benchmark)."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def __call__(self, ev: Any) -> None:
        if ev.kind == "batch":
            now = (time.perf_counter(), ev.rows)
            self.first = self.first or now
            self.last = now

    def rate(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def _steady_read_ips(ds: ScanDataset, batch_size: int, workers: int, dev: torch.device) -> float:
    """Read + preprocess rows/s through the DataLoader, from the first batch on."""
    t_first, n_first, n = 0.0, 0, 0
    for i, b in enumerate(make_loader(ds, batch_size, workers, dev)):
        n += len(b.records)
        if i == 0:
            t_first, n_first = time.perf_counter(), n
    elapsed = time.perf_counter() - t_first
    return (n - n_first) / elapsed if n > n_first and elapsed > 0 else float("nan")


def run_bench(
    paths: Sequence[str | Path] = (),
    model: str | Path | None = None,
    arch: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    n_images: int = 160,
    image_size: int = 1024,
    model_size: int = 256,
    min_seconds: float = 3.0,
    body_part: str = "knee",
) -> dict[str, Any]:
    """Measure every stage; returns the dict printed by ``osteoscan bench --json``."""
    dev = select_device(device)
    plan = configure_cpu(dev, workers)
    allocator = configure_allocator()
    with tempfile.TemporaryDirectory(prefix="osteoscan-bench-") as tmp:
        tmpdir = Path(tmp)
        ref: str | Path | None = _arch_package(tmpdir, arch, model_size) if arch else model
        models = load_models([ref] if ref else [], dev)
        if paths:
            scan_paths: list[str | Path] = list(paths)
        else:
            make_synthetic_jpegs(tmpdir / "images", n_images, image_size)
            scan_paths = [tmpdir / "images"]
        cfg = ScanConfig(
            paths=scan_paths, out=tmpdir / "out" / "results.csv", models=[ref] if ref else [],
            device=device, batch_size=batch_size, workers=plan.workers, body_part=body_part,
        )  # fmt: skip
        files, _ = discover_files(cfg)
        if not files:
            raise UsageError("no image files found to benchmark")
        result = _measure(cfg, files, models, dev, plan.workers, min_seconds)
        result.update(
            batch_size=batch_size, workers=plan.workers, torch_threads=plan.torch_threads,
            device=str(dev), n_images=len(files), model=models[0].label,
            model_input_size=models[0].preprocess.size, allocator_tuned=allocator,
            synthetic=not paths, image_size=None if paths else image_size,
            trunk_graph=any(g.fast is not None for g in models[0].ensemble.groups),
        )  # fmt: skip
    return result


def _measure(
    cfg: ScanConfig,
    files: list[Any],
    models: list[LoadedModel],
    dev: torch.device,
    workers: int,
    min_seconds: float,
) -> dict[str, Any]:
    router = Router([m.ensemble.body_parts for m in models], [m.label for m in models],
                    cfg.body_part)  # fmt: skip
    ds = ScanDataset(files, Loader(router, [m.preprocess for m in models]))

    # 1. read + preprocess, in process (one worker), then with all workers.
    pixels: list[np.ndarray] = []
    t0 = time.perf_counter()
    n_rows = 0
    for i in range(len(ds)):
        recs = ds[i]
        n_rows += len(recs)
        pixels += [r.pixels for r in recs if r.pixels is not None and r.package == 0]
    read_one = n_rows / (time.perf_counter() - t0)
    if not pixels:
        raise UsageError("none of the files could be scored by the model (check --body-part)")

    read_ips = read_one if workers == 0 else _steady_read_ips(ds, cfg.batch_size, workers, dev)

    # 2./3. model only on ready tensors, without and with heatmaps.
    ens = models[0].ensemble
    reps = -(-cfg.batch_size // len(pixels))
    x = torch.from_numpy(np.stack((pixels * reps)[: cfg.batch_size])[:, None])
    if dev.type == "cuda":
        x = x.pin_memory()
    model_ips = _timed(lambda: len(ens.predict(x)), min_seconds)
    all_hm = [True] * len(x)
    model_hm_ips = _timed(lambda: len(ens.predict(x, heatmaps=all_hm)), min_seconds)

    # 4. end to end: a real scan (workers + model + CSV), steady state after the first batch.
    clock = _SteadyClock()
    summary = run_scan(cfg, on_event=clock)
    e2e = clock.rate() or summary.images_per_s
    limiting = "read" if read_ips < model_ips else "model"
    return {
        "read_ips": round(read_ips, 2),
        "read_ips_per_worker": round(read_one, 2),
        "model_ips": round(model_ips, 2),
        "model_heatmap_ips": round(model_hm_ips, 2),
        "end_to_end_ips": round(e2e, 2),
        "limiting_stage": limiting,
        "end_to_end_vs_limiting": round(e2e / min(read_ips, model_ips), 3),
        "heatmap_cost": round(model_ips / model_hm_ips, 3),
    }
