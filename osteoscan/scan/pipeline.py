"""``osteoscan scan`` as a library: discover → read + preprocess (workers) → ensemble → writers.

:func:`run_scan` is the whole run; each stage is a plain function over a batch so incremental
state (issue 6) or another engine can reuse them: :func:`load_models`, :class:`ScanContext`
(:meth:`ScanContext.score_batch` turns a collated :class:`FrameBatch` into a :class:`BatchResult`
of row dicts + arrays), consumed by the incremental state, which rebuilds the outputs
(:mod:`osteoscan.scan.incremental`, :mod:`osteoscan.scan.export`).

Heatmaps. The HDF5 holds one heatmap per scored row, so with ``--hdf5`` (and ``hdf5_heatmaps``)
or ``--heatmaps-for all`` every row is explained in the *same* forward pass as its prediction.
With only ``--heatmaps DIR --heatmaps-for flagged``, the ensemble opens the Grad-CAM forward for
the whole batch (autograd starts at the CAM layer, so this costs about one inference) and
backpropagates only the rows its fused score flags. Scores never depend on the heatmap options.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from osteoscan.discover import Found, discover
from osteoscan.errors import OsteoscanError, UsageError
from osteoscan.scan.routing import Router
from osteoscan.writers import (
    flagged_path_for,
    heatmap_name,
    utc_now,
)

if TYPE_CHECKING:  # torch, OpenCV, pydicom load only once there is something to score
    import torch

    from osteoscan.load import Reader
    from osteoscan.preprocess import PreprocessConfig
    from osteoscan.scan.dataset import FrameBatch, FrameRecord

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # syntax only; availability: select_device


@dataclass
class ScanConfig:
    """Everything one scan needs (the ``osteoscan scan`` options).

    ``models``: package names or folders (empty → the default package); ``workers=None`` picks
    from the machine (:func:`osteoscan.runtime.default_workers`); ``threshold`` overrides the
    packages' screening thresholds; ``heatmaps_for`` picks which scored rows get a PNG.
    ``force`` is kept for incremental runs (issue 6). ``reader`` replaces
    :func:`osteoscan.readers.read_frames` (e.g. a guarded reader).
    """

    paths: Sequence[str | Path]
    out: str | Path
    hdf5: str | Path | None = None
    heatmaps_dir: str | Path | None = None
    heatmaps_for: Literal["flagged", "all"] = "flagged"
    hdf5_heatmaps: bool = True
    models: Sequence[str | Path] = ()
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    body_part: str = "auto"
    covariates: str | Path | None = None
    covariate_columns: tuple[str, str, str] = ("path", "age", "sex")
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    threshold: float | None = None
    force: bool = False
    quiet: bool = False
    reader: Reader | None = None
    # Nightly runs (issue 6, osteoscan.scan.incremental): state file (default next to --out),
    # identifier columns only on request.
    state: str | Path | None = None
    include_phi: bool = False

    def validate(self) -> None:
        """Raise :class:`UsageError` for option values that cannot work."""
        if not self.paths:
            raise UsageError("give at least one PATH to scan")
        # A missing archive (an unmounted share, a typo in a crontab) must fail loudly, not
        # "succeed" with zero rows night after night.
        missing = [str(p) for p in self.paths if not os.path.lexists(p)]
        if missing:
            raise UsageError(f"no such file or folder: {', '.join(missing)}")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be 0 or more")
        if self.heatmaps_for not in ("flagged", "all"):
            raise UsageError("--heatmaps-for must be flagged or all")
        if not _DEVICE.fullmatch((self.device or "auto").strip().lower()):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.body_part not in ("auto", "knee", "spine"):
            raise UsageError("--body-part must be auto, knee or spine")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise UsageError("--threshold must be between 0 and 1")


@dataclass
class ScanEvent:
    """Progress report. ``kind``: ``start`` (after discovery), ``batch`` or ``done``."""

    kind: str
    files_done: int
    files_total: int
    counts: dict[str, int]
    rows: int
    elapsed_s: float
    images_per_s: float
    eta_s: float | None
    message: str = ""


@dataclass
class ScanSummary:
    """What a finished scan did and where it wrote."""

    n_files: int
    n_ignored: int
    rows: int
    counts: dict[str, int]
    elapsed_s: float
    images_per_s: float
    out: Path
    flagged_out: Path
    hdf5: Path | None
    heatmaps_dir: Path | None
    models: list[str]
    device: str
    workers: int
    batch_size: int
    # outputs rewritten by this run ([] when all were already current; None when unknown)
    written: list[Path] | None = None


@dataclass
class LoadedModel:
    """One model package ready to score: label for the ``model`` column, ensemble, preprocessing."""

    label: str
    ensemble: Any  # osteoscan.ensemble.Ensemble
    preprocess: PreprocessConfig
    manifest: dict[str, Any]


def load_models(refs: Sequence[str | Path], device: torch.device) -> list[LoadedModel]:
    """Load each package (default package when ``refs`` is empty) onto ``device``."""
    from osteoscan.ensemble import Ensemble
    from osteoscan.package import load_package
    from osteoscan.preprocess import PreprocessConfig

    out = []
    for ref in list(refs) or [None]:
        pkg = load_package(ref, device=device)
        m = pkg.manifest
        cfg = PreprocessConfig.from_dict(m.preprocess)
        out.append(LoadedModel(f"{m.name} {m.version}", Ensemble(pkg, device), cfg, m.to_dict()))
    if not out:
        raise OsteoscanError("no model package to scan with")
    return out


@dataclass
class ScoredChunk:
    """Predictions of one model for some rows of a batch (rows index into BatchResult.rows)."""

    model: int
    rows: list[int]
    pred: Any  # osteoscan.ensemble.BatchPrediction
    inputs: np.ndarray  # uint16 (K, H, W) model inputs, for overlays


@dataclass
class BatchResult:
    """Rows (dicts keyed by results.csv columns) of one batch, plus the arrays behind them."""

    rows: list[dict[str, Any]]
    chunks: list[ScoredChunk] = field(default_factory=list)
    n_files: int = 0


def base_row(rec: FrameRecord, scanned_at: str) -> dict[str, Any]:
    """The columns every row has, scored or not."""
    return {
        "path": rec.path, "frame": rec.frame, "image_id": rec.image_id, "status": rec.status,
        "reason": rec.reason, "body_part": rec.body_part, "model": "", "scanned_at": scanned_at,
        "covariates": "",
    }  # fmt: skip


class ScanContext:
    """Scores collated batches with the loaded models (no I/O besides nothing: pure compute)."""

    def __init__(self, cfg: ScanConfig, models: Sequence[LoadedModel]) -> None:
        self.cfg = cfg
        self.models = list(models)
        self.table = None
        if cfg.covariates:
            from osteoscan.covariates import CovariateTable

            p, a, s = cfg.covariate_columns
            self.table = CovariateTable.from_csv(cfg.covariates, path_col=p, age_col=a, sex_col=s)
        heat_all = cfg.heatmaps_dir is not None and cfg.heatmaps_for == "all"
        self.heatmaps_same_pass = heat_all or (cfg.hdf5 is not None and cfg.hdf5_heatmaps)
        self.heatmaps_flagged = cfg.heatmaps_dir is not None and cfg.heatmaps_for == "flagged"

    def covariates_for(self, rec: FrameRecord) -> Any:
        """Header covariates, overridden field by field by the covariates CSV; None if none."""
        from osteoscan.covariates import Covariates

        cov = Covariates(age=rec.age, sex=rec.sex)
        if self.table is not None:
            cov = cov.override(self.table.lookup(rec.path, rec.root))
        return None if cov.is_empty() else cov

    def score_batch(self, batch: FrameBatch) -> BatchResult:
        """Predict every routed frame of ``batch``; returns all rows in order."""
        now = utc_now()
        result = BatchResult([base_row(r, now) for r in batch.records], n_files=batch.n_files)
        bs = max(1, self.cfg.batch_size)
        for p, idx in batch.rows.items():
            x_all = batch.pixels[p]
            for s in range(0, len(idx), bs):
                result.chunks.append(
                    self._score(p, idx[s : s + bs], x_all[s : s + bs], batch.records, result.rows)
                )
        return result

    def _score(
        self,
        p: int,
        idx: list[int],
        x: torch.Tensor,
        records: list[FrameRecord],
        rows: list[dict[str, Any]],
    ) -> ScoredChunk:
        m, cfg = self.models[p], self.cfg
        covs = [self.covariates_for(records[i]) for i in idx]
        # Heatmaps come from the scoring pass itself: for every row when all are wanted (HDF5,
        # --heatmaps-for all), else "flagged": the ensemble opens the Grad-CAM forward for the
        # batch and backpropagates only the rows its fused score flags (about inference cost).
        want: list[bool] | str | None = None
        if self.heatmaps_same_pass:
            want = [True] * len(idx)
        elif self.heatmaps_flagged:
            want = "flagged"
        pred = m.ensemble.predict(x, covariates=covs, heatmaps=want, threshold=cfg.threshold)
        inputs = x.numpy()[:, 0] if x.device.type == "cpu" else x.cpu().numpy()[:, 0]
        row_thr = pred.thresholds if pred.thresholds is not None else [pred.threshold] * len(idx)
        classes = m.ensemble.classes
        for k, i in enumerate(idx):
            row = rows[i]
            row.update({f"p_{c}": float(pred.probs[k, j]) for j, c in enumerate(classes)})
            flagged = bool(pred.flagged[k])
            row.update(
                model=m.label, prediction=pred.prediction[k], score=float(pred.score[k]),
                threshold=float(row_thr[k]), flagged=flagged,
                uncertainty=float(pred.uncertainty[k]), covariates=pred.covariates_used[k],
            )  # fmt: skip
            png = cfg.heatmaps_dir is not None and (cfg.heatmaps_for == "all" or flagged)
            if png and pred.heatmaps[k] is not None:
                row["heatmap"] = str(Path(cfg.heatmaps_dir) / heatmap_name(row["image_id"]))
        return ScoredChunk(p, list(idx), pred, inputs)


def discover_files(cfg: ScanConfig) -> tuple[list[Found], int]:
    """Files that become rows (``ignored`` entries dropped) and how many were ignored."""
    files, ignored = [], 0
    for f in discover(cfg.paths, cfg.include, cfg.exclude):
        if f.kind == "ignored":
            ignored += 1
        else:
            files.append(f)
    return files, ignored


class _Progress:
    def __init__(self, total: int, on_event: Callable[[ScanEvent], None] | None) -> None:
        self.total, self.on_event = total, on_event
        self.t0 = time.perf_counter()
        self.files = self.rows = 0
        self.counts = {"ok": 0, "skipped": 0, "error": 0, "flagged": 0}

    def add(self, result: BatchResult) -> None:
        self.files += result.n_files
        self.rows += len(result.rows)
        for row in result.rows:
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
            self.counts["flagged"] += bool(row.get("flagged"))

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

    Bad files are rows (``status=error``), never exceptions. Outputs are published only when the
    run completes; a failed or interrupted run leaves the previous outputs as they were.

    Order: lock, run key from the package manifests, discover, plan. A rescan that finds nothing
    to score and outputs already current stops there (:func:`_nothing_to_do`), before torch or a
    model is loaded: a nightly run over an unchanged archive costs a directory walk and one
    ``stat`` per file.
    """
    cfg.validate()
    from osteoscan.manifest import read_manifest, resolve_package
    from osteoscan.scan.incremental import IncrementalRun

    run = IncrementalRun.start(cfg)  # lock first: a concurrent scan is refused at once
    try:
        manifests = [read_manifest(resolve_package(ref)) for ref in list(cfg.models) or [None]]
        run.bind_manifests(manifests)  # run key; error rows for files that crashed a reader
        files, n_ignored = discover_files(cfg)
        todo = run.plan(files)  # unchanged files are skipped without being opened
        if not todo and run.outputs_current():
            return _nothing_to_do(cfg, run, manifests, files, n_ignored, on_event)
        from osteoscan.load import Loader
        from osteoscan.runtime import configure_cpu, select_device
        from osteoscan.scan.dataset import ScanDataset, make_loader

        device = select_device(cfg.device)
        plan = configure_cpu(device, cfg.workers)
        models = load_models(cfg.models, device)
        run.use_models(models)  # same identities as the manifests planned with
        router = Router(
            [m.ensemble.body_parts for m in models], [m.label for m in models], cfg.body_part
        )
        ctx = ScanContext(cfg, models)
        progress = _Progress(len(todo), on_event)
        progress.emit("start", _start_message(len(todo), len(files), n_ignored))
        workers = min(plan.workers, max(0, len(todo)))

        def loader_for(remaining: list[Found]) -> Any:
            loader = Loader(router, [m.preprocess for m in models], read=cfg.reader or run.reader)
            dataset = ScanDataset(remaining, loader)
            return make_loader(dataset, cfg.batch_size, min(workers, len(remaining)), device)

        def after(result: BatchResult) -> None:
            progress.add(result)
            progress.emit("batch")

        run.drive(todo, loader_for, ctx.score_batch, after)
        state_counts = run.finish()  # outputs regenerated from the state, atomically
    finally:
        run.close()
    progress.counts["unchanged"] = state_counts["unchanged"]
    done = progress.emit("done")
    return ScanSummary(
        n_files=len(files), n_ignored=n_ignored, rows=done.rows, counts=done.counts,
        elapsed_s=done.elapsed_s, images_per_s=done.images_per_s, out=Path(cfg.out),
        flagged_out=flagged_path_for(cfg.out), hdf5=Path(cfg.hdf5) if cfg.hdf5 else None,
        heatmaps_dir=Path(cfg.heatmaps_dir) if cfg.heatmaps_dir else None,
        models=[m.label for m in models], device=str(device), workers=workers,
        batch_size=cfg.batch_size, written=list(run.written),
    )  # fmt: skip


def _start_message(n_todo: int, n_files: int, n_ignored: int) -> str:
    return f"{n_todo} files to scan, {n_files - n_todo} unchanged ({n_ignored} ignored)"


def _nothing_to_do(
    cfg: ScanConfig,
    run: Any,
    manifests: Sequence[Any],
    files: list[Found],
    n_ignored: int,
    on_event: Callable[[ScanEvent], None] | None,
) -> ScanSummary:
    """Finish a run that has nothing to score and nothing to rewrite (same events, summary).

    No model is loaded, so ``device`` is ``"none"`` and ``workers`` 0.
    """
    progress = _Progress(0, on_event)
    progress.emit("start", _start_message(0, len(files), n_ignored))
    progress.counts["unchanged"] = run.state.summary()["unchanged"]
    done = progress.emit("done")
    return ScanSummary(
        n_files=len(files), n_ignored=n_ignored, rows=0, counts=done.counts,
        elapsed_s=done.elapsed_s, images_per_s=0.0, out=Path(cfg.out),
        flagged_out=flagged_path_for(cfg.out), hdf5=Path(cfg.hdf5) if cfg.hdf5 else None,
        heatmaps_dir=Path(cfg.heatmaps_dir) if cfg.heatmaps_dir else None,
        models=[f"{m.name} {m.version}" for m in manifests], device="none", workers=0,
        batch_size=cfg.batch_size, written=[],
    )  # fmt: skip
