"""Device selection and CPU runtime settings (threads, allocator, worker counts).

Why the allocator matters: glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB, raised
dynamically up to 32 MiB) with ``mmap`` and returns them with ``munmap``. A CNN forward allocates
and frees tens of MiB of activations per layer, so every batch pays millions of fresh page faults
(the kernel zero-fills each page). On the 2-core build machines this made EfficientNet-Lite0
inference 2-5x slower (page faults 2.0M → 0.25M per 8 s run). Raising the mmap threshold and the
trim threshold keeps freed blocks in the heap for reuse; capping arenas keeps worker threads from
each holding their own copy. :func:`configure_allocator` does this at run time via ``mallopt``;
``OSTEOSCAN_ALLOCATOR=default`` turns it off (for benchmarks and bisecting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import torch

from osteoscan.errors import UsageError

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 1 << 30  # 1 GiB: activations of any batch we run stay in the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # never give freed heap back to the kernel mid-run
_ARENA_MAX = 2

_allocator_state: dict[str, bool] = {}


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` → first CUDA device when available, else CPU; ``cpu``; ``cuda``/``cuda:N``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available on this machine")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return dev
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_allocator() -> bool:
    """Make glibc malloc keep large freed blocks for reuse (see module docs); idempotent.

    Returns True when the settings were applied, False on non-glibc systems or when
    ``OSTEOSCAN_ALLOCATOR=default``. Call early, before worker threads allocate.
    """
    if "applied" in _allocator_state:
        return _allocator_state["applied"]
    applied = False
    if os.environ.get("OSTEOSCAN_ALLOCATOR", "").lower() != "default":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
            ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
            ok &= mallopt(_M_ARENA_MAX, _ARENA_MAX) == 1
            applied = bool(ok)
        except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt, nothing to do
            applied = False
    _allocator_state["applied"] = applied
    return applied


@dataclass(frozen=True)
class CpuPlan:
    """How the cores are shared: DataLoader workers and torch intra-op threads."""

    workers: int
    torch_threads: int


def default_workers(device: torch.device) -> int:
    """DataLoader workers when the user gives none.

    CUDA: enough CPU processes to keep the device busy (all cores, at most 8). CPU: the model
    needs cores too, so one worker per two cores (at least one), leaving the rest to torch.
    """
    cores = cpu_count()
    if device.type == "cuda":
        return max(1, min(8, cores))
    return max(1, cores // 2)


def plan_cpu(device: torch.device, workers: int | None) -> CpuPlan:
    """Split the cores between workers and torch threads so they do not oversubscribe.

    On CPU each busy worker takes one core from torch's thread pool: an oversubscribed OpenMP
    pool spins at barriers while its threads wait to be scheduled, which costs far more than
    the idle core it would otherwise leave.
    """
    n_workers = default_workers(device) if workers is None else max(0, int(workers))
    cores = cpu_count()
    forced = os.environ.get("OSTEOSCAN_TORCH_THREADS", "")
    if forced.isdigit() and int(forced) > 0:  # for benchmarking other splits
        return CpuPlan(n_workers, int(forced))
    if device.type == "cuda":
        return CpuPlan(n_workers, max(1, min(4, cores - n_workers)))
    return CpuPlan(n_workers, max(1, cores - n_workers))


def configure_cpu(device: torch.device, workers: int | None) -> CpuPlan:
    """Apply the allocator settings and torch thread count for a scan; returns the plan."""
    plan = plan_cpu(device, workers)
    configure_allocator()
    if torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    return plan


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one thread each for OpenCV and torch inside a worker.

    Each worker is one unit of parallelism; letting OpenCV or torch spawn a pool per worker
    would oversubscribe the cores the model runs on. A worker also dies with its parent (the
    forkserver, which dies with the scan): nothing outlives a killed scan.
    """
    import cv2

    from osteoscan.scan.engines.lifeline import die_with_parent, scan_pid, watch_scan

    scan = scan_pid()
    die_with_parent(scan=scan)
    if scan is not None:
        watch_scan(scan)

    # A worker is a fresh interpreter (forkserver): the scan's mallopt settings do not carry
    # over, and the default allocator cost reading about a third of its speed.
    configure_allocator()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
