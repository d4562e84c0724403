"""``osteoscan train`` under ``torchrun``: members spread over processes, rank 0 writes.

``torchrun --nproc-per-node N -m osteoscan train ...`` starts N copies of the command with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`launch` sees them and joins the process group
(gloo on CPU, NCCL on GPUs, one GPU per local rank), splitting the machine's CPU threads so N
processes do not oversubscribe the cores. Then:

- rank 0 alone reads and preprocesses the data, de-duplicates and splits it (the other ranks
  wait), and hands the model inputs and the split to the others (:meth:`Dist.share`): one read
  pass instead of N, one writer of ``--cache-dir``, and the same inputs on every rank by
  construction;
- several members (K folds, several architectures): member ``i`` is fitted on rank ``i % N``
  with the same seed as in one process; the fitted states, histories and held-out and
  validation logits come back to rank 0 (:meth:`Dist.gather`), which adds them in member order,
  so the sums (and the package) are those of one process;
- one member: every rank fits it with DistributedDataParallel (:mod:`osteoscan.train.ddp`);
- rank 0 alone calibrates, evaluates, writes the package and prints progress; the others
  return ``None`` and exit 0.

Failures: a rank that raises records why in the process group's store (:meth:`Dist.guard`);
a rank waiting for the others (:meth:`Dist.wait`, before every exchange) stops with that
message and the same exit code, or when a peer's heartbeat stops for ``OSTEOSCAN_DIST_DEAD_S``
seconds (default 120). Waits have no other limit: a fold may take an hour while its peers idle.
Collectives themselves (DDP's gradient all-reduce, the exchanges once everyone is there) time
out after ``OSTEOSCAN_DIST_TIMEOUT_S`` seconds (default 600). torchrun also stops every rank
when one exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as td

from osteoscan.errors import OsteoscanError
from osteoscan.runtime import cpu_count
from osteoscan.train.loop import TrainEvent
from osteoscan.train.members import (
    FoldParts,
    MemberFit,
    Members,
    add_member,
    fit_member_at,
    member_plan,
)
from osteoscan.train.recipe import TrainConfig

__all__ = ["Dist", "PeerFailed", "launched", "launch", "fit_members_distributed", "ranks_of"]

_FAILED = "osteoscan/failed"
_HEARTBEAT_S = 2.0


class PeerFailed(OsteoscanError):
    """Another rank failed or stopped responding; this rank stops with the same exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return (rank, world) if world > 1 else None


def ranks_of(n_members: int, world: int) -> list[int]:
    """The rank that fits each member: member ``i`` on rank ``i % world``."""
    return [i % world for i in range(n_members)]


@dataclass
class Dist:
    """This process's place in the process group, and the exchanges training needs."""

    rank: int
    world: int
    local_rank: int
    backend: str
    store: Any = field(repr=False)
    objects: Any = field(default=None, repr=False)  # a gloo group for pickled objects
    _beat: threading.Event = field(default_factory=threading.Event, repr=False)

    # --- failures and waits -------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._beat.wait(_HEARTBEAT_S):
            try:
                self.store.add(f"osteoscan/hb/{self.rank}", 1)
            except Exception:  # the store's host has gone: the waits will say so
                return

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Record in the store why this rank failed (first failure wins), then re-raise."""
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, PeerFailed):
                known = isinstance(exc, OsteoscanError)
                code = exc.exit_code if isinstance(exc, OsteoscanError) else 1
                text = str(exc) if known else f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    if not self.store.check([_FAILED]):
                        self.store.set(_FAILED, f"{self.rank}\t{code}\t{text}")
                    self._linger()
            raise

    def _linger(self, seconds: float = 5.0) -> None:
        """Stay a moment so the waiting ranks read the failure (rank 0 may host the store)."""
        others = [f"{_FAILED}/seen/{r}" for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.store.check(others):
            time.sleep(0.1)

    def _raise_if_failed(self) -> None:
        if self.store.check([_FAILED]):
            rank, code, text = self.store.get(_FAILED).decode("utf-8", "replace").split("\t", 2)
            self.store.set(f"{_FAILED}/seen/{self.rank}", "1")
            raise PeerFailed(f"stopped: rank {rank} failed: {text}", int(code))

    def wait(self, tag: str) -> None:
        """Block until every rank reached ``tag``; raise :class:`PeerFailed` when one failed."""
        try:
            self._wait(tag)
        except (RuntimeError, OSError) as exc:  # torch's DistNetworkError is a RuntimeError
            raise PeerFailed(f"stopped: lost the process group's store ({exc})") from exc

    def _wait(self, tag: str) -> None:
        dead_after = _env_seconds("OSTEOSCAN_DIST_DEAD_S", 120.0)
        self.store.set(f"osteoscan/at/{tag}/{self.rank}", "1")
        keys = [f"osteoscan/at/{tag}/{r}" for r in range(self.world)]
        seen: dict[int, tuple[int, float]] = {}
        while True:
            self._raise_if_failed()
            if self.store.check(keys):
                return
            now = time.monotonic()
            for r in range(self.world):
                beats = self.store.add(f"osteoscan/hb/{r}", 0)
                if r not in seen or seen[r][0] != beats:
                    seen[r] = (beats, now)
                elif r != self.rank and now - seen[r][1] > dead_after:
                    raise PeerFailed(f"stopped: rank {r} gave no sign of life for "
                                     f"{dead_after:.0f} s")  # fmt: skip
            time.sleep(0.2)

    # --- exchanges ----------------------------------------------------------------------
    def share(self, payload: Any, tag: str) -> Any:
        """Rank 0's ``payload`` on every rank (others pass ``None``)."""
        self.wait(tag)
        box = [payload if self.rank == 0 else None]
        td.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def gather(self, items: list[Any], tag: str) -> list[Any] | None:
        """Every rank's ``items`` concatenated on rank 0 (``None`` elsewhere)."""
        self.wait(tag)
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        td.gather_object(items, out, dst=0, group=self.objects)
        if out is None:
            return None
        return [x for part in out for x in part]

    def device(self, base: torch.device) -> torch.device:
        """This rank's device: its own GPU (by local rank) when training on CUDA."""
        if base.type != "cuda":
            return base
        return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        self._beat.set()
        if td.is_initialized():
            td.destroy_process_group()


_CURRENT: Dist | None = None


def launch(device: str = "auto", num_threads: int | None = None) -> Dist | None:
    """Join torchrun's process group (once per process); None when not under torchrun."""
    global _CURRENT
    where = launched()
    if where is None:
        return None
    if _CURRENT is not None:
        return _CURRENT
    rank, world = where
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # NCCL needs a GPU of its own per rank; fewer GPUs than local ranks (or CPU) means gloo.
    use_nccl = device != "cpu" and n_gpus >= local_world
    if use_nccl:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=_env_seconds("OSTEOSCAN_DIST_TIMEOUT_S", 600.0))
    backend = "nccl" if use_nccl else "gloo"
    td.init_process_group(backend, timeout=timeout)
    objects = td.new_group(backend="gloo", timeout=timeout) if use_nccl else None
    if num_threads is None:
        # torchrun sets OMP_NUM_THREADS=1; this machine's cores are shared by its local ranks.
        torch.set_num_threads(max(1, cpu_count() // max(1, local_world)))
    from torch.distributed.distributed_c10d import _get_default_store

    _CURRENT = Dist(rank, world, local_rank, backend, _get_default_store(), objects)
    _CURRENT.store.add(f"osteoscan/hb/{rank}", 1)
    threading.Thread(target=_CURRENT._heartbeat, name="osteoscan-heartbeat", daemon=True).start()
    return _CURRENT


def shutdown() -> None:
    """Leave the process group :func:`launch` joined (no-op otherwise)."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
        _CURRENT = None


def fit_members_distributed(
    dist: Dist, cfg: TrainConfig, X: torch.Tensor, y: np.ndarray, parts: list[FoldParts],
    n_classes: int, pos_idx: list[int], device: torch.device,
    emit: Callable[[TrainEvent], None], tscores: np.ndarray | None = None,
) -> Members | None:  # fmt: skip
    """This rank's share of :func:`~osteoscan.train.members.fit_members`; rank 0 gets them all.

    Several members: member ``i`` on rank ``i % world``, gathered on rank 0 and added in member
    order. One member: fitted by every rank with DistributedDataParallel.
    """
    from osteoscan.archs import create_model
    from osteoscan.train.ddp import make_ddp_fit

    plan = member_plan(cfg, parts)
    kfold = cfg.folds >= 2
    if len(plan) == 1:
        fit, model = fit_member_at(cfg, X, y, parts, 0, n_classes, pos_idx, device, emit,
                                   tscores=tscores, fit=make_ddp_fit(dist))  # fmt: skip
        if dist.rank != 0:
            return None
        out = Members(n=len(y), n_classes=n_classes)
        add_member(out, fit, model, kfold)
        return out
    owners = ranks_of(len(plan), dist.world)
    mine = [i for i, r in enumerate(owners) if r == dist.rank]
    emit(TrainEvent("phase", message=f"{len(plan)} members over {dist.world} processes "
                    f"(member i on rank i mod {dist.world}); this rank fits "
                    + ", ".join(f"m{i}" for i in mine)))  # fmt: skip
    fits = [
        fit_member_at(cfg, X, y, parts, i, n_classes, pos_idx, device, emit, tscores=tscores)[0]
        for i in mine
    ]
    emit(TrainEvent("phase", message="waiting for the other processes' members"))
    every: list[MemberFit] | None = dist.gather(fits, "members")
    if every is None:
        return None
    out = Members(n=len(y), n_classes=n_classes)
    for fit in sorted(every, key=lambda f: f.index):
        # The package's model is rebuilt from the fitted state, as loading a package does.
        model = create_model(fit.arch, n_classes, pretrained=False)
        model.load_state_dict(fit.state)
        model.pretrained_source = fit.spec.pretrained  # type: ignore[assignment]
        add_member(out, fit, model.eval(), kfold)
    return out
