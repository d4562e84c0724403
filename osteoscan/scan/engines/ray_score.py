"""The score stage as a Ray Data actor pool, after the Ray load tasks of :mod:`.ray_data`.

:class:`ScoringActor` loads the model packages once per actor (:func:`~osteoscan.scan.score.
load_models` on the actor's device, one GPU each where the cluster has GPUs) and runs the same
:class:`~osteoscan.scan.score.Scorer` as the local path on the same
:class:`~osteoscan.scan.batch.FrameBatch` of ``batch_size`` files, so the rows are identical.
:func:`scored_batches` streams :class:`ScoredBatch` objects back to the driver in file order; the
driver alone records and exports (one writer).

The covariate tally (where each row's age and sex came from, for the summary) lives in the
driver's ``Scorer``: each actor sends back the lookups it made, in order, and the driver replays
them (:meth:`ScoredBatch.replay`), so the summary equals a local run's.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from osteoscan.discover import Found
from osteoscan.errors import OsteoscanError
from osteoscan.load import LoadedFrame, Loader
from osteoscan.rows import ScoredRow
from osteoscan.scan.batch import collate_frames
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.engines.ray_data import RayEngine

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]

    from osteoscan.covariates import CovariateTally

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
    """One Ray actor holding the models: a block of loaded files in, their scored rows out.

    ``key``: the run key the driver planned with; an actor that loads other packages (one
    replaced meanwhile) refuses to score, as the local path does.
    """

    def __init__(self, cfg: ScanConfig, key: str, device: str, heatmaps_flagged: bool) -> None:
        from osteoscan.runtime import configure_cpu, select_device
        from osteoscan.scan.plan import run_key_for
        from osteoscan.scan.score import Scorer, load_models

        dev = select_device(device)
        configure_cpu(dev, 0)  # the actor's own cores go to torch
        models = load_models(cfg.models, dev)
        if run_key_for(cfg, [m.manifest for m in models]) != key:
            raise OsteoscanError("a model package changed while this scan was running")
        self.scorer = Scorer(cfg, models)
        self.scorer.heatmaps_flagged = self.scorer.heatmaps_flagged or heatmaps_flagged

    def __call__(self, table: pa.Table) -> pa.Table:
        from osteoscan.scan.engines.ray_data import _dumps, _table

        out = [_dumps(self._chunk(pickle.loads(blob))) for blob in table.column("out").to_pylist()]
        return _table(table.column("c").to_pylist(), out)

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
    heatmaps_flagged: bool = False,
) -> Iterator[ScoredBatch]:
    """Load tasks → :class:`ScoringActor` pool → :class:`ScoredBatch` of ``cfg.batch_size`` files.

    ``actors``: the pool size (default: one per GPU of the cluster, else one on CPU). With GPUs
    each actor takes one and scores on ``cuda``; on CPU each takes one CPU and scores on it.
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
            },  # fmt: skip
            batch_size=1,  # one chunk: the batch_size files the local path would collate
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
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
