"""``osteoscan scan`` as a library: the orchestrator that calls the stages in one direction.

::

    ScanSession (lock, state, stop signals)
      │
      ├─ discover   scan.plan.discover_files       paths → files (content-sniffed)
      ├─ plan       scan.plan.plan_files           files → the new or changed ones (state)
      ├─ load       osteoscan.load.Loader          file → model inputs or status records
      │               run by an engine (scan.engines.local: DataLoader workers, restarts)
      ├─ score      scan.score.Scorer              batch → ScoredRow (ensemble, heatmaps)
      ├─ record     scan.record.record_batch       ScoredRow → state (one transaction a batch)
      └─ export     scan.export                    state → CSV, flagged CSV, HDF5; PNGs per batch

Each stage returns its output to :func:`run_scan`, which hands it to the next; no stage calls back
up. A rescan that finds nothing to score and outputs already current stops after *plan*, before
torch or a model is loaded: a nightly run over an unchanged archive costs a directory walk and one
``stat`` per file.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from osteoscan.discover import Found, recheck
from osteoscan.errors import OsteoscanError
from osteoscan.rows import ScoredRow
from osteoscan.scan.backfill import META_KEY as HEATMAP_META
from osteoscan.scan.backfill import attach_heatmaps, heatmap_options, paths_missing_heatmaps
from osteoscan.scan.config import ScanConfig, ScanEvent, ScanSummary
from osteoscan.scan.export import (
    export_outputs,
    outputs_current,
    redaction_secret,
    write_heatmap_pngs,
)
from osteoscan.scan.plan import discover_files, plan_files, record_orphans, run_key_for
from osteoscan.scan.record import record_batch
from osteoscan.scan.session import ScanSession
from osteoscan.scan.state import ScanState
from osteoscan.scan.vanished import check_roots_not_emptied, mark_vanished
from osteoscan.writers import flagged_path_for

if TYPE_CHECKING:
    from osteoscan.covariates import CovariateSummary
    from osteoscan.manifest import Manifest
    from osteoscan.pacs.publish import DicomResults
    from osteoscan.pacs.source import PacsSource
    from osteoscan.scan.score import LoadedModel

__all__ = ["ScanConfig", "ScanEvent", "ScanSummary", "run_scan"]


class _Progress:
    """Counts of this run's rows, reported as :class:`ScanEvent` to ``on_event``."""

    def __init__(self, total: int, on_event: Callable[[ScanEvent], None] | None) -> None:
        self.total, self.on_event = total, on_event
        self.t0 = time.perf_counter()
        self.files = self.rows = 0
        self.counts = {"ok": 0, "skipped": 0, "error": 0, "flagged": 0}

    def add(self, scored: Sequence[ScoredRow], n_files: int) -> None:
        self.files += n_files
        self.rows += len(scored)
        for item in scored:
            self.counts[item.row.status] = self.counts.get(item.row.status, 0) + 1
            self.counts["flagged"] += item.row.is_flagged

    def emit(self, kind: str, message: str = "") -> ScanEvent:
        elapsed = time.perf_counter() - self.t0
        ips = self.rows / elapsed if elapsed > 0 else 0.0
        fps = self.files / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.files) / fps if fps > 0 else None
        ev = ScanEvent(kind, self.files, self.total, dict(self.counts), self.rows, elapsed, ips,
                       eta, message)  # fmt: skip
        if self.on_event is not None:
            self.on_event(ev)
        return ev


def run_scan(cfg: ScanConfig, on_event: Callable[[ScanEvent], None] | None = None) -> ScanSummary:
    """Scan ``cfg.paths`` and write the outputs; raises :class:`OsteoscanError` if the run fails.

    Bad files are rows (``status=error``), never exceptions. Outputs are published only whole; a
    failed or interrupted run leaves the previous outputs as they were, and its committed rows
    in the state for the next run.
    """
    cfg.validate()
    from osteoscan.manifest import read_manifest, resolve_package

    with ScanSession(cfg) as session:  # lock first: a concurrent scan is refused at once
        state = session.state
        refs: list[str | Path | None] = [*cfg.models] or [None]
        manifests = [read_manifest(resolve_package(ref)) for ref in refs]
        key = run_key_for(cfg, manifests)
        source = _pacs_source(cfg, manifests, session) if cfg.dicomweb else None
        rename = source.key_of if source is not None else None
        record_orphans(state, session.inflight_dir, key, rename=rename)  # crashed earlier runs
        if source is not None:  # a DICOMweb server: search, not a walk; nothing "vanishes"
            files, n_ignored = source.discover(state)
            n_vanished = 0
        else:
            known = state.signatures()  # every completed file, read once a night
            files, n_ignored = discover_files(cfg, known)  # unchanged files are not opened
            found = {str(f.path) for f in files}
            check_roots_not_emptied(known, cfg.paths, found)  # an unmounted share: no change
            n_vanished = mark_vanished(state, known, cfg.paths, found, prune=cfg.prune)
        todo = plan_files(state, files, key, cfg.force)
        n_planned = len(todo)
        if source is not None:  # ruled out by the search attributes: skipped, not retrieved
            todo = source.prefilter(state, todo, key)
        # heatmaps for earlier rows of a DICOMweb source would need a retrieval: not backfilled
        redo = _missing_heatmaps(cfg, state, key, files, todo) if source is None else []
        progress = _Progress(n_planned + len(redo), on_event)
        if source is not None:
            progress.add(source.take_recorded(), source.n_skipped)
        message = _start_message(n_planned, len(files), n_ignored, len(redo), n_vanished,
                                 cfg.prune)  # fmt: skip
        progress.emit("start", f"{source.describe()}: {message}" if source else message)
        results = _dicom_results(cfg, manifests, session) if cfg.dicom_out or cfg.send else None
        labels = [f"{m.name} {m.version}" for m in manifests]
        device, workers, written, cov = "none", 0, list[Path](), None
        sizes: list[int] = []
        if todo or redo:
            models, device, workers = _prepare(cfg, key)
            sizes = [m.preprocess.size for m in models]
            workers = min(workers, len(todo) + len(redo))
            run = _Run(cfg, session, models, key, workers, device, progress, manifests, source,
                       results)  # fmt: skip
            workers = run.engine.workers  # the summary names the engine's real concurrency
            try:
                if todo:
                    written += run.score(todo)
                if redo and session.stop_signal is None:
                    written += run.score(redo, heatmaps_only=True)
            finally:
                run.close()
            cov = _covariate_summary(cfg, run) if todo else None
        if written or todo or redo or not outputs_current(state, cfg):
            new = _export(cfg, state, manifests, sizes)  # no model needed to rewrite outputs
            written += [p for p in new if p not in written]
        # KOS per study, then STOW of everything pending (also what earlier runs failed to send)
        result_warnings = results.finish(state) if results is not None else []
        session.raise_if_stopped()
        if source is not None:
            source.finish(state)  # complete: the next default search starts from today
        state.set_meta(HEATMAP_META, heatmap_options(cfg))  # complete: every row has its maps
        progress.counts["unchanged"] = state.summary()["unchanged"]
        done = progress.emit("done")
        totals = state.totals()
    return ScanSummary(
        n_files=len(files), n_ignored=n_ignored, rows=done.rows, counts=done.counts,
        elapsed_s=done.elapsed_s, images_per_s=done.images_per_s if todo else 0.0,
        out=Path(cfg.out), flagged_out=flagged_path_for(cfg.out),
        hdf5=Path(cfg.hdf5) if cfg.hdf5 else None,
        heatmaps_dir=Path(cfg.heatmaps_dir) if cfg.heatmaps_dir else None, models=labels,
        device=device, workers=workers, batch_size=cfg.batch_size, written=written, totals=totals,
        covariates=cov.line() if cov else "",
        warnings=(cov.warnings() if cov else []) + result_warnings,
        dicom_results=results.line() if results is not None else "",
    )  # fmt: skip


def _pacs_source(
    cfg: ScanConfig, manifests: Sequence[Manifest], session: ScanSession
) -> PacsSource:
    """The DICOMweb front end (:mod:`osteoscan.pacs.source`) of a ``dicomweb+http…`` scan."""
    from osteoscan.pacs.source import PacsSource

    return PacsSource(cfg, manifests, session.state_path)


def _dicom_results(
    cfg: ScanConfig, manifests: Sequence[Manifest], session: ScanSession
) -> DicomResults:
    """The DICOM results stage (:mod:`osteoscan.pacs.publish`) of ``--dicom-out``/``--send``."""
    from osteoscan.pacs.publish import DicomResults

    return DicomResults(cfg, manifests, session.state_path)


def _covariate_summary(cfg: ScanConfig, run: _Run) -> CovariateSummary:
    """Where this run's age/sex came from; with --redact-paths no file name appears in it."""
    summary = run.scorer.tally.summary()
    if not cfg.redact_paths:
        return summary
    hidden = "[redacted]"
    return dataclasses.replace(
        summary,
        unmatched_rows=(hidden,) * len(summary.unmatched_rows),
        images_without_row=(hidden,) * len(summary.images_without_row),
        unusable=tuple((hidden, col, val) for _, col, val in summary.unusable),
    )


def _prepare(cfg: ScanConfig, key: str) -> tuple[list[LoadedModel], str, int]:
    """Load the models on the chosen device; they must be the packages the plan was made for.

    A package replaced between reading its manifest and loading its weights would make stored
    rows lie about which model scored them, so that is refused (rerun to pick it up).
    """
    from osteoscan.runtime import configure_cpu, select_device
    from osteoscan.scan.score import load_models

    device = select_device(cfg.device)
    plan = configure_cpu(device, cfg.workers)
    models = load_models(cfg.models, device)
    if run_key_for(cfg, [m.manifest for m in models]) != key:
        raise OsteoscanError(
            "a model package changed while this scan was starting; nothing was scored - "
            "run the same command again"
        )
    return models, str(device), plan.workers


def _missing_heatmaps(
    cfg: ScanConfig, state: ScanState, key: str, files: list[Found], todo: list[Found]
) -> list[Found]:
    """Unchanged files whose rows lack heatmaps the options now ask for (none when the heatmap
    options are those of the last complete run: its rows were made with them)."""
    if state.meta(HEATMAP_META) == heatmap_options(cfg):
        return []
    png = str(cfg.heatmaps_dir) if cfg.heatmaps_dir else None
    blob = cfg.hdf5 is not None and cfg.hdf5_heatmaps
    want = paths_missing_heatmaps(state, key, blob=blob, png_dir=png,
                                  png_all=cfg.heatmaps_for == "all")  # fmt: skip
    planned = {str(f.path) for f in todo}
    return [recheck(f) for f in files if str(f.path) in want and str(f.path) not in planned]


class _Run:
    """load → score → (PNGs) → record, batch by batch, until done or a stop signal."""

    def __init__(
        self,
        cfg: ScanConfig,
        session: ScanSession,
        models: list[LoadedModel],
        key: str,
        workers: int,
        device: str,
        progress: _Progress,
        manifests: Sequence[Manifest],
        source: PacsSource | None = None,
        results: DicomResults | None = None,
    ) -> None:
        import torch

        from osteoscan.load import Loader
        from osteoscan.scan.engines import make_engine
        from osteoscan.scan.routing import Router
        from osteoscan.scan.score import Scorer

        self.cfg, self.session, self.models, self.key = cfg, session, models, key
        self.manifests = list(manifests)
        self.progress = progress
        router = Router([m.ensemble.body_parts for m in models], [m.label for m in models],
                        cfg.body_part)  # fmt: skip
        # a copy of each radiograph travels with it only when a heatmap PNG may be drawn on it
        keep_display = cfg.heatmaps_dir is not None or cfg.dicom_heatmaps
        self.source = source
        if source is None:
            self.loader = Loader(router, [m.preprocess for m in models], keep_display=keep_display)
        else:  # reads retrieved instances from the source's cache, rows keyed dicomweb:…
            self.loader = source.loader(router, [m.preprocess for m in models], keep_display)
        self.engine = make_engine(cfg, torch.device(device), workers, session.inflight_dir)
        self.scorer = Scorer(cfg, models)
        self.results = results
        if cfg.dicom_heatmaps:  # the flagged rows' maps, for the secondary captures
            self.scorer.heatmaps_flagged = True

    def close(self) -> None:
        """Release the engine (a Ray engine stops a local Ray it started)."""
        from osteoscan.scan.engines import close_engine

        close_engine(self.engine)

    def score(self, files: list[Found], *, heatmaps_only: bool = False) -> list[Path]:
        """Score ``files`` (or, with ``heatmaps_only``, add heatmaps to their stored rows).

        Returns the outputs re-exported on the way (long runs publish progress periodically).
        A DICOMweb source retrieves them a chunk at a time (retrieval failures are error rows).
        """
        if self.source is None:
            return self._score(files, heatmaps_only)
        written, state = list[Path](), self.session.state
        for chunk in self.source.chunks(state, files, self.key):
            failed = self.source.take_recorded()  # error rows of retrievals that failed
            self.progress.add(failed, len(failed))
            if chunk:
                written += self._score(chunk, heatmaps_only)
            if self.session.stop_signal is not None:
                break
        return written

    def _score(self, files: list[Found], heatmaps_only: bool) -> list[Path]:
        cfg, state = self.cfg, self.session.state
        keep_heatmaps = cfg.hdf5 is not None and cfg.hdf5_heatmaps
        last_export, written = time.monotonic(), list[Path]()
        from osteoscan.scan.engines import scored_stream

        for scored, n_files in scored_stream(
            self.engine, files, self.loader, self.scorer, self.key
        ):
            if self.source is not None:  # a reader death names the cache file: key it
                for item in scored:
                    item.row.path = self.source.key_of(item.row.path)
            if self.results is not None and not heatmaps_only:  # needs the source file: now
                self.results.add(scored, self.source.local if self.source else Path)
            write_heatmap_pngs(scored, cfg.heatmaps_dir)  # before the rows that name them
            if heatmaps_only:
                attach_heatmaps(state, [s for s in scored if s.row.status == "ok"]
                                if keep_heatmaps else _without_maps(scored))  # fmt: skip
                self.progress.add([], n_files)
            else:
                record_batch(state, scored, self.key, keep_heatmaps=keep_heatmaps,
                             include_phi=cfg.include_phi)  # fmt: skip
                self.progress.add(scored, n_files)
            self.progress.emit("batch")
            if time.monotonic() - last_export >= cfg.export_every_s:  # long runs: publish
                written += _export(cfg, state, self.manifests,
                                   [m.preprocess.size for m in self.models])  # fmt: skip
                last_export = time.monotonic()
            if self.session.stop_signal is not None:
                break
        return written


def _without_maps(scored: list[ScoredRow]) -> list[ScoredRow]:
    """The ok rows with their PNG paths but no stored map (no HDF5 asked for)."""
    for item in scored:
        item.heatmap = None
    return [s for s in scored if s.row.status == "ok"]


def _export(
    cfg: ScanConfig, state: ScanState, manifests: Sequence[Manifest], sizes: Sequence[int] = ()
) -> list[Path]:
    """Regenerate the outputs older than the state (``sizes``: model input sizes, when loaded;
    without them the HDF5 heatmaps keep the shape of those stored)."""
    from osteoscan.rows import union_classes

    return export_outputs(
        state, cfg.out, hdf5=cfg.hdf5,
        classes=union_classes([m.classes for m in manifests]),
        manifests={f"{m.name} {m.version}": m.to_dict() for m in manifests},
        heatmap_size=(max(sizes), max(sizes)) if sizes else None, phi=cfg.include_phi,
        redact=redaction_secret(state, cfg),
    )  # fmt: skip


def _start_message(
    n_todo: int, n_files: int, n_ignored: int, n_redo: int, n_vanished: int, prune: bool
) -> str:
    text = f"{n_todo} files to scan, {n_files - n_todo} unchanged ({n_ignored} ignored)"
    if n_redo:
        text += f"; heatmaps to add for {n_redo} files"
    if n_vanished:
        text += f"; {n_vanished} files gone ({'pruned' if prune else 'marked missing'})"
    return text
