"""The Ray Data engine: the load stage as Ray CPU tasks, on this machine or on a cluster.

The driver (the ``scan`` process) keeps everything with state: discovery, planning, scoring (or
see :mod:`.ray_cluster` for an actor pool), recording and export. Only the load stage moves:

- the planned files become a dataset of small descriptors (``ray.data.from_items``: chunks of a
  few files, each file its index and pickled :class:`~osteoscan.discover.Found` - file names need
  not be UTF-8, so they travel pickled, not as Arrow strings), at most :data:`WINDOW` files a
  dataset;
- ``map_batches`` runs the :class:`~osteoscan.load.Loader` on them as CPU tasks, a chunk a call,
  with the same per-file guards as the local engine (:class:`RayReader`: soft time limit,
  address-space cap, hard watchdog);
- the driver iterates the result as a stream (Ray Data's streaming executor holds back the tasks
  when the driver falls behind: memory stays bounded over any archive), restores file order and
  collates ``batch_size`` files a :class:`~osteoscan.scan.batch.FrameBatch`, exactly as
  :class:`~.local.LocalEngine` does, so the rows are the same.

Dead readers. A decoder that crashes its process, or the hard watchdog ending a decoder stuck in
C, kills the Ray worker in the middle of a task. Ray retries the task (``max_retries``); before
each file the task asks a small ledger actor (:class:`_Ledger`) how many readers died on it (started
and never finished). A file on which ``blame_after`` readers died is not read again: it becomes
an ``error`` record naming the cause (the worker's in-flight log says whether it was the hard time
limit, when the retry runs on the same node), and the other files of the task are read as usual.
If Ray gives up on a task anyway, the driver starts a new dataset over the files it has not yet
received (at most :data:`MAX_RESTARTS` times); the ledger survives, so a culprit is blamed then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osteoscan.discover import Found
from osteoscan.errors import OsteoscanError
from osteoscan.frames import ImageFrame
from osteoscan.guards import GuardLimits, Watchdog, limit_memory, orphaned_inflight
from osteoscan.load import LoadedFrame, Loader
from osteoscan.scan.batch import FrameBatch, collate_frames
from osteoscan.scan.engines.local import GuardedReader
from osteoscan.scan.engines.ray_cluster import RaySession, block, dumps

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]

MAX_RESTARTS = 20
MAX_STALLS = 3  # restarts in a row that yielded nothing
WINDOW = 20_000  # files in one dataset
MAX_BLOCKS = 2_000  # blocks in one dataset
# Benchmarks only: read each file this many times (a decode made artificially heavy; re-reading
# an uncompressed file is mostly memory traffic, which two cores of one host share).
DECODE_REPEAT_ENV = "OSTEOSCAN_RAY_DECODE_REPEAT"
# Benchmarks only: after each read, this many rounds of pure computation (SHA-256 over a buffer
# that stays in the core's cache): a decode made artificially CPU-heavy, as entropy and wavelet
# decoding of compressed radiographs is, with a fixed amount of work a file.
DECODE_WORK_ENV = "OSTEOSCAN_RAY_DECODE_WORK"
_WORK_BUFFER = bytes(range(256)) * 256  # 64 KiB: fits any core's L2 cache
_PROCESS_DOGS: dict[tuple[int, str | None, float | None], Watchdog] = {}
_INITIALISED: int | None = None  # pid of the Ray worker whose reader stack is set up
DIED = "the reader process died on this file (a decoder crash or the hard time limit)"


class RayReader(GuardedReader):
    """:class:`GuardedReader` for Ray workers: the address-space cap applies in every Ray
    worker (they never touch CUDA). Benchmarks only: ``repeat`` > 1 decodes each file that many
    times (:data:`DECODE_REPEAT_ENV`), ``work`` adds that many rounds of pure computation a file
    (:data:`DECODE_WORK_ENV`); neither changes what is read."""

    def __init__(
        self, limits: GuardLimits, inflight_dir: str | Path | None, repeat: int = 1, work: int = 0
    ) -> None:
        super().__init__(limits, inflight_dir)
        self.repeat = max(1, int(repeat))
        self.work = max(0, int(work))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "repeat": self.repeat, "work": self.work}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limits"], state["inflight_dir"], state.get("repeat", 1),  # type: ignore[misc]
                      state.get("work", 0))  # fmt: skip

    def _setup(self) -> Watchdog:
        # Ray hands each task a fresh copy of this reader: the cap and the watchdog (a thread,
        # an open log) are per process, kept at module level, made by the first task only.
        key = (os.getpid(), self.inflight_dir, self.limits.hard_seconds)
        if key not in _PROCESS_DOGS:
            if not any(k[0] == key[0] for k in _PROCESS_DOGS):
                limit_memory(self.limits.memory_bytes)
            try:
                _PROCESS_DOGS[key] = Watchdog(self.inflight_dir, self.limits.hard_seconds)
            except OSError:  # another node, where the driver's folder cannot be made
                local = Path(tempfile.gettempdir()) / f"osteoscan-inflight-{os.getuid()}"
                _PROCESS_DOGS[key] = Watchdog(local, self.limits.hard_seconds)
        dog = _PROCESS_DOGS[key]
        if dog.dir is not None and str(dog.dir) != self.inflight_dir:  # the local fallback
            self.inflight_dir = str(dog.dir)  # where _LoadTask._cause looks for dead readers
            _PROCESS_DOGS[(key[0], self.inflight_dir, key[2])] = dog
        return dog

    def __call__(self, path: str | Path, kind: str | None = None) -> list[ImageFrame]:
        for _ in range(self.repeat - 1):
            super().__call__(path, kind)
        frames = super().__call__(path, kind)
        busy_work(self.work)
        return frames


def busy_work(rounds: int) -> bytes:
    """``rounds`` of SHA-256 over a cache-resident buffer: a fixed amount of pure computation
    (benchmarks: a decode made CPU-heavy, see :data:`DECODE_WORK_ENV`)."""
    digest = b""
    for _ in range(rounds):
        hasher = hashlib.sha256(digest)  # chained: each round depends on the last
        hasher.update(_WORK_BUFFER)
        digest = hasher.digest()
    return digest


class _Ledger:
    """Per-file count of readers started and finished, kept by one actor for the whole scan."""

    def __init__(self) -> None:
        self.started: dict[int, int] = {}
        self.finished: dict[int, int] = {}
        self.notes: dict[str, str] = {}

    def start(self, i: int) -> int:
        """Mark file ``i`` started; returns how many readers died on it before."""
        deaths = self.started.get(i, 0) - self.finished.get(i, 0)
        self.started[i] = self.started.get(i, 0) + 1
        return deaths

    def finish(self, i: int) -> None:
        self.finished[i] = self.finished.get(i, 0) + 1

    def note(self, path: str, reason: str) -> None:
        """Keep an in-flight log's reason (e.g. the hard time limit) for ``path``."""
        self.notes[path] = reason

    def reason(self, path: str) -> str | None:
        return self.notes.get(path)


@dataclasses.dataclass
class _LoadTask:
    """The ``map_batches`` function: loads the files of one block (see the module docstring)."""

    loader: Loader
    ledger: Any
    blame_after: int

    def __call__(self, table: pa.Table) -> pa.Table:
        global _INITIALISED
        if os.getpid() != _INITIALISED:  # once per Ray worker: one OpenCV and torch thread
            from osteoscan.runtime import worker_init

            worker_init()
            _INITIALISED = os.getpid()
        chunks = [pickle.loads(blob) for blob in table.column("f").to_pylist()]
        out = [dumps([self._file(i, found) for i, found in chunk]) for chunk in chunks]
        return block(table.column("c").to_pylist(), out)

    def _file(self, i: int, found: Found) -> list[LoadedFrame]:
        import ray

        deaths = ray.get(self.ledger.start.remote(i))  # synchronous: recorded before reading
        if deaths >= self.blame_after:
            frames = [error_record(found, self._cause(found))]
        else:
            frames = load_file(found, self.loader)
        ray.get(self.ledger.finish.remote(i))
        return frames

    def _cause(self, found: Found) -> str:
        """Why readers died on ``found``: this node's in-flight logs of dead readers say (a
        crash, or the hard time limit), kept in the ledger for retries on other nodes."""
        import ray

        inflight = getattr(self.loader.read, "inflight_dir", None)
        for path, why, _ in orphaned_inflight(inflight) if inflight else []:
            ray.get(self.ledger.note.remote(path, why))
        return ray.get(self.ledger.reason.remote(str(found.path))) or DIED


def load_file(found: Found, loader: Loader) -> list[LoadedFrame]:
    """The load stage on one file, exactly as :class:`~.local.ScanDataset` runs it."""
    if found.kind == "broken":
        return [error_record(found, found.reason or "not a readable image file")]
    return loader(found.path, found.kind, found.root)


def error_record(found: Found, reason: str) -> LoadedFrame:
    """An ``error`` record for ``found`` (as the local engine writes one for a dead reader)."""
    return LoadedFrame(path=str(found.path), root=str(found.root), frame=0, kind=found.kind,
                       status="error", reason=reason)  # fmt: skip


class RayEngine:
    """The load stage as Ray Data tasks (see the module docstring); the ``Engine`` shape.

    ``workers``: concurrent load tasks (default: the cluster's CPUs); ``files_per_task``: files
    in one task (small, so a dead worker costs few re-reads and the stream stays smooth);
    ``read`` replaces the guarded reader (tests inject one that kills its process).
    """

    def __init__(
        self,
        batch_size: int,
        inflight_dir: Path | None,
        limits: GuardLimits | None = None,
        *,
        workers: int | None = None,
        address: str | None = None,
        files_per_task: int = 2,
        blame_after: int = 1,
        read: Any = None,
        session: RaySession | None = None,
    ) -> None:
        self.session = session or RaySession(address)
        self.workers = max(1, int(workers or self.session.cpus()))
        self.batch_size = max(1, int(batch_size))
        self.files_per_task = max(1, int(files_per_task))
        self.blame_after = max(1, int(blame_after))
        repeat = int(os.environ.get(DECODE_REPEAT_ENV, "1") or 1)
        work = int(os.environ.get(DECODE_WORK_ENV, "0") or 0)
        self.read = read or RayReader(limits or GuardLimits(), inflight_dir, repeat, work)
        self.restarts, self._issued = 0, 0
        # started now (its process boots while the driver plans), used by every dataset
        self._ledger: Any = self.session.ray.remote(num_cpus=0)(_Ledger).remote()

    def close(self) -> None:
        """Stop the ledger and the Ray that this engine started."""
        if self._ledger is not None and self.session.ray.is_initialized():
            self.session.ray.kill(self._ledger)
        self._ledger = None
        self.session.close()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batches(self, files: Sequence[Found], loader: Loader) -> Iterator[FrameBatch]:
        """Collated batches over ``files`` in file order; every file exactly once."""
        pending: list[list[LoadedFrame]] = []
        for frames in self.stream(files, loader):
            pending.append(frames)
            if len(pending) == self.batch_size:
                yield collate_frames(pending)
                pending = []
        if pending:
            yield collate_frames(pending)

    def stream(
        self,
        files: Sequence[Found],
        loader: Loader,
        then: Callable[[Any], Any] | None = None,
        chunk: int | None = None,
    ) -> Iterator[Any]:
        """Per file, in file order: its load-stage records, or, when ``then`` adds stages to the
        dataset (:mod:`.ray_cluster`), the last stage's payload for it.

        Files travel in chunks of ``chunk`` (default ``files_per_task``): one row of the dataset,
        loaded by one task call and handed whole to the next stage. One dataset covers at most
        :data:`WINDOW` files (the driver's descriptors stay small on any archive). When Ray
        gives up on a dataset, a new one covers the files not yet yielded.
        """
        task = _LoadTask(dataclasses.replace(loader, read=self.read), self._ledger,
                         self.blame_after)  # fmt: skip
        size = max(1, int(chunk or self.files_per_task))
        # ledger ids unique over the engine's life: a scan streams several file lists
        items, stalled = list(enumerate(files, start=self._issued)), 0
        self._issued += len(items)
        while items:
            done = 0
            try:
                for start in range(0, len(items), WINDOW):
                    for out in self._stream(items[start : start + WINDOW], task, then, size):
                        done += 1
                        yield out
                return
            except OsteoscanError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray's, or wrapped by Ray Data; see below
                # A dataset Ray gave up on: go on with the files not yet yielded, unless that
                # keeps failing with no progress (then it is not a file's fault: a real failure)
                stalled = 0 if done else stalled + 1
                if self.restarts >= MAX_RESTARTS or stalled >= MAX_STALLS:
                    raise OsteoscanError(f"the Ray load stage failed: {exc}") from exc
                self.restarts += 1
                items = items[done:]

    def _stream(
        self,
        items: list[tuple[int, Found]],
        task: _LoadTask,
        then: Callable[[Any], Any] | None,
        size: int,
    ) -> Iterator[Any]:
        """One dataset over ``items`` in chunks of ``size``: each file's payload, in order."""
        import ray.data

        chunks = [items[k : k + size] for k in range(0, len(items), size)]
        rows = [{"c": c, "f": dumps(chunk)} for c, chunk in enumerate(chunks)]
        n_blocks = min(len(rows), MAX_BLOCKS)  # one chunk a task, unless very many
        source = ray.data.from_items(rows, override_num_blocks=n_blocks)
        # Order from Ray itself (this dataset's own copy of the context); the reorder buffer
        # below then holds no more than the blocks already in flight.
        ctx = source.context
        ctx.execution_options.preserve_order = True
        # the scan reports progress itself: no progress bars or banners on its terminal
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = ctx.enable_auto_log_stats = False
        # no per-task memory sampling: a thread reading the worker's whole memory map every
        # second, CPU taken from the decode that the scan does not use
        ctx.memory_usage_poll_interval_s = None
        per_task = -(-len(items) // n_blocks)
        with warnings.catch_warnings():  # max_retries has no named parameter yet (Ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = source.map_batches(
                task,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=1,
                compute=ray.data.TaskPoolStrategy(size=self.workers),
                # A dead worker's task is retried; each death is charged to the file it was
                # reading, which is blamed after ``blame_after`` of them, so a bound suffices
                # (Ray Data's default is to retry forever).
                max_retries=self.blame_after * per_task + 2,
            )
        if then is not None:
            ds = then(ds)
        held: dict[int, list[Any]] = {}
        nxt = 0
        batch: Any
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            for c, blob in zip(batch.column("c").to_pylist(), batch.column("out").to_pylist(),
                               strict=True):  # fmt: skip
                held[c] = pickle.loads(blob)
            while nxt in held:
                yield from held.pop(nxt)
                nxt += 1
        if nxt != len(chunks):  # never expected: Ray returned fewer rows than it was given
            raise OsteoscanError(f"the Ray load stage lost {len(chunks) - nxt} chunks of files")
