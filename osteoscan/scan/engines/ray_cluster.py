"""How a scan reaches Ray, and the score stage as a Ray Data actor pool.

**Connecting.** :class:`RaySession` joins a cluster (``--ray-address``), reuses a connection
already made, or starts a local Ray sized to this machine, and stops what it started. Ray is
imported only here, lazily: without it, :class:`~osteoscan.errors.UsageError` (exit 2) says how
to install it. A local Ray listens on loopback only, sends no usage statistics, keeps the scan's
own SIGTERM/SIGINT handling, and nothing of it outlives a killed scan (:func:`_start_reaper`).

**Scoring on the cluster** (optional: by default the driver scores what
:class:`~.ray_data.RayEngine` loads). :class:`ScoringActor` loads the model packages once per
actor (:func:`~osteoscan.scan.score.load_models` on the actor's device, one GPU each where the
cluster has GPUs) and runs the same :class:`~osteoscan.scan.score.Scorer` as the local path on the
same :class:`~osteoscan.scan.batch.FrameBatch` of ``batch_size`` files, so the rows are identical.
:func:`scored_batches` streams :class:`ScoredBatch` objects back in file order; the driver alone
records and exports (one writer). The covariate tally (where each row's age and sex came from,
for the summary) stays the driver's: actors send back the lookups they made, in order, and the
driver replays them (:meth:`ScoredBatch.replay`), so the summary equals a local run's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from osteoscan.discover import Found
from osteoscan.errors import OsteoscanError, UsageError
from osteoscan.load import LoadedFrame, Loader
from osteoscan.rows import ScoredRow
from osteoscan.scan.batch import collate_frames
from osteoscan.scan.config import ScanConfig

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]

    from osteoscan.covariates import CovariateTally
    from osteoscan.scan.engines.ray_data import RayEngine

INSTALL_HINT = 'the Ray engine needs Ray: pip install -e ".[distributed]"'


def import_ray() -> Any:
    """``ray`` with Ray Data, or :class:`UsageError` (exit 2) saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra, not only the core
    except ImportError as exc:
        raise UsageError(INSTALL_HINT) from exc
    return ray


class RaySession:
    """Connects to Ray for one scan: joins ``address``, reuses a connection already made, or
    starts a local Ray sized to this machine; :meth:`close` stops what it began.

    A local Ray listens on loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when
    ``ray`` is first imported: Ray's single-machine mode), requires Ray's token (kept in
    ``~/.ray/auth_token``, made by Ray when missing) and sends no usage statistics. Its head
    processes die with the scan (Ray's own fate sharing), except two agents that outlive a
    SIGKILLed driver; a small reaper process (:data:`_REAPER`) ends them then.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not address and "ray" not in sys.modules:  # both are read once, by Ray's import
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # token authentication (Ray's default for a local start), said so: no banner
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        self.ray = import_ray()
        self.started = False
        self._reaper: subprocess.Popen[bytes] | None = None
        # Ray Data's banners and stats would interleave with the scan's own progress lines
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        if self.ray.is_initialized():
            return  # a test fixture or the caller connected already: theirs to shut down
        common: dict[str, Any] = dict(log_to_driver=False, configure_logging=False)
        with _signal_handlers_kept():
            if address:
                self.ray.init(address=address, **common)
            else:
                from osteoscan.runtime import cpu_count

                self.ray.init(num_cpus=num_cpus or cpu_count(), include_dashboard=False,
                              _node_ip_address="127.0.0.1", **common)  # fmt: skip
                self._reaper = _start_reaper()
        self.started = True

    def cpus(self) -> int:
        """CPUs the cluster offers (at least 1)."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def gpus(self) -> int:
        """GPUs the cluster offers."""
        return int(self.ray.cluster_resources().get("GPU", 0))

    def close(self) -> None:
        """Shut down (or disconnect from) Ray if this session connected."""
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False
        if self._reaper is not None and self._reaper.stdin is not None:
            self._reaper.stdin.close()  # EOF: it ends whatever the shutdown left behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=10)
            self._reaper = None


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Restore SIGTERM/SIGINT handlers after the block: ``ray.init`` installs a SIGTERM handler
    that exits at once, and the scan's own (stop after the current batch, export) must stay."""
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


# Waits for EOF on stdin (the scan ended, however), then ends the listed processes that still
# are the ones it was given (pid and start time: a reused pid is left alone).
_REAPER = """
import os, sys, time
def start(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
procs = [tuple(map(int, a.split(":"))) for a in sys.argv[1:]]
sys.stdin.buffer.read()
for sig in (15, 9):
    for pid, t in procs:
        if start(pid) == t:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    time.sleep(1)
"""


def _stat(pid: int | str) -> list[bytes]:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, ...); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_reaper() -> subprocess.Popen[bytes] | None:
    """A reaper for the processes the local Ray start left under this one (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    stats = {int(e): f for e in os.listdir("/proc") if e.isdigit() and len(f := _stat(e)) > 19}
    mine, frontier = [], {os.getpid()}
    while frontier:  # descendants, generation by generation
        frontier = {pid for pid, f in stats.items() if int(f[1]) in frontier}
        mine += sorted(frontier)
    args = [f"{pid}:{int(stats[pid][19])}" for pid in mine]
    return subprocess.Popen([sys.executable, "-c", _REAPER, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def dumps(obj: Any) -> bytes:
    """Pickled for a binary column of a block (file names need not be UTF-8)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def block(chunk_ids: list[int], payloads: list[bytes]) -> pa.Table:
    """A block of the stream: chunk number and its pickled per-file payloads."""
    import pyarrow as pa

    return pa.table({"c": pa.array(chunk_ids, pa.int64()),
                     "out": pa.array(payloads, pa.large_binary())})  # fmt: skip


# (age, sex, path, root) of one covariate lookup, as Scorer.covariates_for makes it
Lookup = tuple[float | None, str | None, str, str]


@dataclass
class ScoredBatch:
    """The rows of ``n_files`` files in file order, and the covariate lookups made for them."""

    scored: list[ScoredRow]
    n_files: int
    lookups: list[Lookup]

    def replay(self, tally: CovariateTally) -> None:
        """Count this batch's covariate lookups in the driver's ``tally`` (same order)."""
        from osteoscan.covariates import Covariates

        for age, sex, path, root in self.lookups:
            tally.resolve(Covariates(age=age, sex=sex), path, root)


class ScoringActor:
    """One Ray actor holding the models: chunks of loaded files in, their scored rows out.

    ``key``: the run key the driver planned with; an actor that loads other packages (one
    replaced meanwhile) refuses to score, as the local path does. ``threads``: torch threads on
    CPU (the CPUs Ray reserved for the actor, so decode tasks keep theirs).
    """

    def __init__(
        self, cfg: ScanConfig, key: str, device: str, heatmaps_flagged: bool, threads: int = 1
    ) -> None:
        import torch

        from osteoscan.runtime import configure_cpu, select_device
        from osteoscan.scan.plan import run_key_for
        from osteoscan.scan.score import Scorer, load_models

        dev = select_device(device)
        configure_cpu(dev, 0)
        if dev.type == "cpu":
            torch.set_num_threads(max(1, threads))
        models = load_models(cfg.models, dev)
        if run_key_for(cfg, [m.manifest for m in models]) != key:
            raise OsteoscanError("a model package changed while this scan was running")
        self.scorer = Scorer(cfg, models)
        self.scorer.heatmaps_flagged = self.scorer.heatmaps_flagged or heatmaps_flagged

    def __call__(self, table: pa.Table) -> pa.Table:
        out = [dumps(self._chunk(pickle.loads(blob))) for blob in table.column("out").to_pylist()]
        return block(table.column("c").to_pylist(), out)

    def _chunk(self, loaded: list[list[LoadedFrame]]) -> list[tuple[list[ScoredRow], list[Lookup]]]:
        """Score one chunk (a FrameBatch, as the local path collates it); rows per file. The
        chunk's covariate lookups travel with its first file, to be replayed once, in order."""
        batch = collate_frames(loaded)
        lookups = [_lookup(batch.records[i]) for rows in batch.rows.values() for i in rows]
        scored = self.scorer.score(batch)
        out, start = [], 0
        for k, frames in enumerate(loaded):  # a file's rows are contiguous
            out.append((scored[start : start + len(frames)], lookups if k == 0 else []))
            start += len(frames)
        return out


def _lookup(rec: LoadedFrame) -> Lookup:
    return (rec.age, rec.sex, rec.path, rec.root)


def scored_batches(
    engine: RayEngine,
    files: Sequence[Found],
    loader: Loader,
    cfg: ScanConfig,
    key: str,
    *,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    heatmaps_flagged: bool = False,
) -> Iterator[ScoredBatch]:
    """Load tasks → :class:`ScoringActor` pool → :class:`ScoredBatch` of ``cfg.batch_size`` files.

    ``actors``: the pool size (default: one per GPU of the cluster, else one on CPU). With GPUs
    each actor takes one and scores on ``cuda``; on CPU each takes ``cpus_per_actor`` CPUs (as
    torch threads). ``heatmaps_flagged``: as the driver's ``Scorer`` with ``--dicom-heatmaps``.
    """
    import ray.data

    gpus = engine.session.gpus()
    size = max(1, int(actors or gpus or 1))
    device = "cuda" if gpus else "cpu"
    files_per_block = max(1, int(cfg.batch_size))

    def then(ds: Any) -> Any:
        return ds.map_batches(
            ScoringActor,
            fn_constructor_kwargs={
                "cfg": cfg,
                "key": key,
                "device": device,
                "heatmaps_flagged": heatmaps_flagged,
                "threads": cpus_per_actor,
            },
            batch_size=1,  # one chunk: the batch_size files the local path would collate
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else cpus_per_actor,
        )

    pending: list[tuple[list[ScoredRow], list[Lookup]]] = []
    for item in engine.stream(files, loader, then, chunk=files_per_block):
        pending.append(item)
        if len(pending) == files_per_block:
            yield _joined(pending)
            pending = []
    if pending:
        yield _joined(pending)


def _joined(items: list[tuple[list[ScoredRow], list[Lookup]]]) -> ScoredBatch:
    return ScoredBatch([r for rows, _ in items for r in rows], len(items),
                       [lk for _, lks in items for lk in lks])  # fmt: skip
