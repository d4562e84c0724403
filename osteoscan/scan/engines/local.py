"""The local engine: the load stage in PyTorch DataLoader worker processes on this machine.

- One dataset item per file (:class:`ScanDataset`): the :class:`~osteoscan.load.Loader` run on
  it, with a :class:`GuardedReader` that caps each worker's memory and keeps an in-flight log for
  the hard :class:`~osteoscan.guards.Watchdog`.
- Workers start from a ``forkserver`` (:func:`worker_context`), never by forking this process.
- When a reader process dies (a decoder crash, the hard time limit), the DataLoader raises; the
  in-flight log names the file, which is yielded as an ``error`` record, and a new DataLoader
  continues with the files not yet yielded. A DataLoader failure with no such log is re-raised.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.context
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from osteoscan.discover import Found
from osteoscan.frames import ImageFrame
from osteoscan.guards import GuardLimits, Watchdog, guarded_read, limit_memory, orphaned_inflight
from osteoscan.load import LoadedFrame, Loader
from osteoscan.runtime import worker_init
from osteoscan.scan.batch import FrameBatch, collate_frames
from osteoscan.scan.engines.lifeline import SCAN_PID_ENV

MAX_LOADER_RESTARTS = 50
# first preload of the forkserver: it dies with the scan (see osteoscan.scan.engines.lifeline)
FORKSERVER_GUARD = "osteoscan.scan.engines._forkserver"


class GuardedReader:
    """Picklable reader for the :class:`~osteoscan.load.Loader` with per-file guards.

    Set up lazily once per process: in DataLoader workers it caps the address space
    (:func:`~osteoscan.guards.limit_memory`); everywhere it keeps an in-flight log and the hard
    watchdog (:class:`~osteoscan.guards.Watchdog`).
    """

    def __init__(self, limits: GuardLimits, inflight_dir: str | Path | None) -> None:
        self.limits = limits
        self.inflight_dir = str(inflight_dir) if inflight_dir else None
        self._pid: int | None = None
        self._dog: Watchdog | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"limits": self.limits, "inflight_dir": self.inflight_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limits"], state["inflight_dir"])  # type: ignore[misc]

    def _setup(self) -> Watchdog:
        if self._pid != os.getpid() or self._dog is None:
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:  # a worker process: never the CUDA main process
                limit_memory(self.limits.memory_bytes)
            self._dog = Watchdog(self.inflight_dir, self.limits.hard_seconds)
            self._pid = os.getpid()
        return self._dog

    def __call__(self, path: str | Path, kind: str | None = None) -> list[ImageFrame]:
        with self._setup().reading(path):
            return guarded_read(path, kind, self.limits)


class ScanDataset(Dataset):
    """Map-style dataset over discovered files: item ``i`` is the load stage on file ``i``."""

    def __init__(self, files: Sequence[Found], loader: Loader) -> None:
        self.files = list(files)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> list[LoadedFrame]:
        found = self.files[index]
        if found.kind == "broken":
            return [_error(str(found.path), found.reason or "not a readable image file", found)]
        return self.loader(found.path, found.kind, found.root)


def _error(path: str, reason: str, found: Found | None = None) -> LoadedFrame:
    root, kind = (str(found.root), found.kind) if found is not None else ("", "")
    return LoadedFrame(path=path, root=root, frame=0, kind=kind, status="error", reason=reason)


class LocalEngine:
    """DataLoader workers on this machine (see the module docstring).

    ``read`` replaces the guarded reader (tests inject a reader that crashes its process).
    """

    def __init__(
        self,
        device: torch.device,
        workers: int,
        batch_size: int,
        inflight_dir: Path,
        limits: GuardLimits | None = None,
        read: Any = None,
    ) -> None:
        self.device, self.workers, self.batch_size = device, int(workers), int(batch_size)
        self.inflight_dir = inflight_dir
        self.read = read or GuardedReader(limits or GuardLimits(), inflight_dir)
        self.restarts = 0

    def batches(self, files: Sequence[Found], loader: Loader) -> Iterator[FrameBatch]:
        """Collated batches over ``files`` in order, surviving dead reader processes."""
        loader = dataclasses.replace(loader, read=self.read)
        remaining = list(files)
        while remaining:
            done = 0
            try:
                dataset = ScanDataset(remaining, loader)
                workers = min(self.workers, len(remaining))
                for batch in make_loader(dataset, self.batch_size, workers, self.device):
                    done += batch.n_files
                    yield batch
                return
            except (RuntimeError, OSError, EOFError):
                # A dead worker surfaces as RuntimeError from the DataLoader's watchdog, or as a
                # reset pipe when it dies mid-send; only an in-flight log makes it a reader death.
                time.sleep(0.2)  # let the dead worker's in-flight log be final
                dead = {path: reason for path, reason, _ in orphaned_inflight(self.inflight_dir)}
                if not dead or self.restarts >= MAX_LOADER_RESTARTS:
                    raise  # not a reader death we can name: a real failure
                self.restarts += 1
            yield collate_frames([[_error(p, why)] for p, why in dead.items()])
            remaining = [f for f in remaining[done:] if str(f.path) not in dead]


def worker_context() -> multiprocessing.context.BaseContext:
    """Start workers from a clean ``forkserver`` process, never by forking this one.

    Forking a process whose OpenCV (or OpenMP) thread pool has run copies the pool's locks in
    whatever state they were: the child then deadlocks in ``cv2.setNumThreads`` or the first
    parallel OpenCV call (seen here when a bench generated images before starting workers). The
    forkserver imports the reader stack once; each worker forks from it cheaply.

    Consequences, as with ``spawn``: the dataset's reader must be picklable, and a *script* that
    calls :func:`~osteoscan.scan.pipeline.run_scan` with workers must guard its entry point with
    ``if __name__ == "__main__":`` (workers import the main module). The CLI already does.
    """
    ctx = multiprocessing.get_context("forkserver")
    os.environ[SCAN_PID_ENV] = str(os.getpid())  # the forkserver dies with this process
    # The forkserver starts as ``python -c …``, so its sys.path begins with the current folder
    # and its preload imports happen before the parent's sys.path is applied: run from a folder
    # that holds an ``osteoscan/`` directory (a clone's parent), the preload imported *that* as a
    # namespace package and every worker inherited the broken module. PYTHONSAFEPATH (3.11+)
    # keeps the current folder off the forkserver's path; on 3.10 osteoscan itself is not
    # preloaded (workers then import it with the parent's sys.path).
    if sys.version_info >= (3, 11):
        os.environ.setdefault("PYTHONSAFEPATH", "1")
        ctx.set_forkserver_preload([FORKSERVER_GUARD, "osteoscan.scan.engines.local",
                                    "osteoscan.readers"])  # fmt: skip
    else:
        ctx.set_forkserver_preload([FORKSERVER_GUARD, "torch", "cv2", "pydicom"])
    return ctx


def make_loader(
    dataset: ScanDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    prefetch_factor: int = 2,
) -> DataLoader:
    """DataLoader over files in discovery order; pinned memory + persistent workers on CUDA."""
    cuda = device.type == "cuda"
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(
            worker_init_fn=worker_init,
            prefetch_factor=prefetch_factor,
            persistent_workers=cuda,
            multiprocessing_context=worker_context(),
        )
    return DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=max(0, int(workers)),
        collate_fn=collate_frames,
        pin_memory=cuda,
        **kwargs,
    )
