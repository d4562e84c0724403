"""Execution engines: how the load stage runs over many files and feeds the score stage.

An engine takes the files the plan stage chose and a :class:`~osteoscan.load.Loader`, and yields
:class:`~osteoscan.scan.batch.FrameBatch` objects in order; the orchestrator scores, records and
exports them. It owns everything about *where* loading runs (worker processes, restarts, per-file
watchdogs) and nothing about rows, state or outputs. :class:`~.local.LocalEngine` runs PyTorch
DataLoader workers on this machine; another engine (e.g. Ray Data) is an added module with the
same :class:`Engine` shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from osteoscan.discover import Found
from osteoscan.load import Loader
from osteoscan.scan.batch import FrameBatch

if TYPE_CHECKING:
    import torch

    from osteoscan.rows import ScoredRow
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.score import Scorer


class Engine(Protocol):
    """Runs the load stage over ``files`` and yields collated batches in file order."""

    workers: int

    def batches(self, files: Sequence[Found], loader: Loader) -> Iterator[FrameBatch]:
        """Every file of ``files`` appears in exactly one batch (a file whose reader process
        died is yielded as an ``error`` record naming the crash)."""
        ...


def make_engine(cfg: ScanConfig, device: torch.device, workers: int, inflight: Path) -> Engine:
    """The load-stage engine ``cfg.engine`` names; Ray is imported only when asked for."""
    if cfg.engine == "ray":
        from osteoscan.scan.engines.ray_data import RayEngine

        # A cluster: every CPU it offers unless --workers says. A local Ray: this machine's split
        # between readers and the model, as for the local engine (the driver scores).
        n = cfg.workers if cfg.ray_address else max(1, workers)
        return RayEngine(cfg.batch_size, inflight, cfg.limits, workers=n, address=cfg.ray_address)
    from osteoscan.scan.engines.local import LocalEngine

    return LocalEngine(device, workers, cfg.batch_size, inflight, cfg.limits)


def scored_stream(
    engine: Engine, files: Sequence[Found], loader: Loader, scorer: Scorer, key: str
) -> Iterator[tuple[list[ScoredRow], int]]:
    """Per batch: its scored rows and its number of files, in file order. Scored here by
    ``scorer``, or, with ``--ray-model-actors``, by a pool of Ray actors (the driver's covariate
    tally is replayed so the summary stays exact)."""
    cfg = scorer.cfg
    if cfg.engine == "ray" and cfg.ray_actors:
        from osteoscan.scan.engines.ray_cluster import scored_batches
        from osteoscan.scan.engines.ray_data import RayEngine

        assert isinstance(engine, RayEngine)
        for sb in scored_batches(engine, files, loader, cfg, key, actors=cfg.ray_actors,
                                 heatmaps_flagged=scorer.heatmaps_flagged):  # fmt: skip
            sb.replay(scorer.tally)
            yield sb.scored, sb.n_files
        return
    for batch in engine.batches(files, loader):
        yield scorer.score(batch), batch.n_files


def close_engine(engine: Engine) -> None:
    """Release an engine (the Ray engine stops a Ray it started; nothing for the local one)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
