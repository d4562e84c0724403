"""The nightly side of ``run_scan``: lock, state, guarded reading, recording and clean stops.

:class:`IncrementalRun` is what :func:`osteoscan.scan.pipeline.run_scan` calls around its
loader loop:

1. ``IncrementalRun.start(cfg)`` takes the locks (state and ``--out``; refused at once with
   :class:`~osteoscan.errors.LockHeldError` naming the holder) and opens the state;
   ``bind_manifests(manifests)`` derives the run key from the package identities (manifests
   only: no torch, no weights) and the row-changing options, and records as ``error`` rows the
   files that crashed or hung a reader in an earlier run (:mod:`osteoscan.guards`: in-flight
   logs of dead processes); ``use_models(models)`` attaches the loaded models (same key).
2. ``plan(files)`` → the files to read (unchanged ones are skipped without being opened).
3. ``drive(todo, loader_for, score, after)``: iterates batches, writes heatmap PNGs, records each
   batch in one transaction, re-exports the outputs every ``export_every_s``; when a reader
   process dies (decoder crash, hard time limit) the file it was reading becomes an error row and
   a new loader continues with what is left. SIGINT/SIGTERM stop after the current batch.
4. ``finish()`` regenerates the outputs from the state (only those older than it); ``close()``.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.errors import OsteoscanError
from osteoscan.frames import ImageFrame
from osteoscan.guards import (
    GuardLimits,
    Watchdog,
    guarded_read,
    limit_memory,
    orphaned_inflight,
    tidy_inflight,
)
from osteoscan.scan.export import export_outputs
from osteoscan.scan.lock import LockSet, lock_path_for
from osteoscan.scan.state import ResultRow, ScanState, default_state_path, run_key, utc_now

PHI_COLUMNS = ("patient_id", "accession_number")
MAX_LOADER_RESTARTS = 50
SUSPECT_LIMIT = 2  # runs that died while reading the same file before it is an error row


class GuardedReader:
    """Picklable reader for :class:`~osteoscan.scan.dataset.ScanDataset` with per-file guards.

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


def _file_digest(path: str | Path | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def phi_values(path: str) -> dict[str, str]:
    """Patient ID and accession number of a DICOM file (only for ``--include-phi``)."""
    out = dict.fromkeys(PHI_COLUMNS, "")
    try:
        import pydicom

        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["PatientID", "AccessionNumber"],
        )
        out["patient_id"] = str(ds.get("PatientID", "") or "")
        out["accession_number"] = str(ds.get("AccessionNumber", "") or "")
    except Exception:  # noqa: BLE001 - not a DICOM, or unreadable: no identifiers
        pass
    return out


class IncrementalRun:
    """State + locks + guards of one scan run (see the module docstring for the sequence)."""

    def __init__(self, cfg: Any, state: ScanState, locks: LockSet) -> None:
        self.cfg, self.state, self.locks = cfg, state, locks
        self.models: list[Any] = []
        self.key = ""
        self.include_phi = bool(getattr(cfg, "include_phi", False))
        self.inflight_dir = Path(str(state.path) + ".inflight")
        self.reader = GuardedReader(
            getattr(cfg, "limits", None) or GuardLimits(), self.inflight_dir
        )
        self.export_every_s = float(getattr(cfg, "export_every_s", 300.0))
        self.stop_signal: str | None = None
        self._old_handlers: dict[int, Any] = {}
        self._last_export = time.monotonic()
        self.restarts = 0
        self.written: list[Path] = []  # outputs rewritten by this run, in order

    def bind(self, models: Sequence[Any]) -> None:
        """Set the loaded models of this run (binding their manifests first if not done yet)."""
        if not self.key:
            self.bind_manifests([m.manifest for m in models])
        self.use_models(models)

    def bind_manifests(self, manifests: Sequence[Any]) -> None:
        """Derive the run key from the packages' manifests, then triage crashes of earlier runs.

        Needs no model weights (and no torch): a rescan can tell from the manifests alone
        whether anything needs scoring before it pays for loading a model.
        """
        self.key = self._key_for(manifests)
        self._record_orphans()

    def use_models(self, models: Sequence[Any]) -> None:
        """The loaded models that score and export this run; they must match the bound key.

        A package replaced between reading its manifest and loading its weights would make the
        stored rows lie about which model scored them, so that is refused (rerun to pick it up).
        """
        key = self._key_for([m.manifest for m in models])
        if self.key and key != self.key:
            raise OsteoscanError(
                "a model package changed while this scan was starting; nothing was scored - "
                "run the same command again"
            )
        self.key = key
        self.models = list(models)

    def _key_for(self, manifests: Sequence[Any]) -> str:
        cfg = self.cfg
        return run_key(
            [_identity(m) for m in manifests],
            {
                "threshold": cfg.threshold,
                # "auto" changed meaning after 0.1.0 (files stating no part take the single served
                # part instead of being skipped): a new key rescans rows stored under the old one.
                "body_part": "auto/single-part" if cfg.body_part == "auto" else cfg.body_part,
                "covariates": _file_digest(cfg.covariates),
                "covariate_columns": list(cfg.covariate_columns),
                "heatmaps": [bool(cfg.heatmaps_dir), cfg.heatmaps_for, bool(cfg.hdf5)],
                "include_phi": self.include_phi,
            },
        )

    def outputs_current(self) -> bool:
        """True when results.csv, the flagged CSV and the HDF5 (if asked for) exist and reflect
        every committed row: a run with nothing to score then has nothing to write either."""
        from osteoscan.writers import flagged_path_for

        targets = [("csv", self.cfg.out), ("flagged", flagged_path_for(self.cfg.out))]
        if self.cfg.hdf5 is not None:
            targets.append(("hdf5", self.cfg.hdf5))
        return not any(self.state.needs_export(name, path) for name, path in targets)

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: Any) -> IncrementalRun:
        """Lock (or raise LockHeldError at once), open the state, install the stop handlers."""
        state_path = Path(getattr(cfg, "state", None) or default_state_path(cfg.out))
        locks = LockSet([lock_path_for(state_path), lock_path_for(cfg.out)]).acquire()
        try:
            state = ScanState.open(state_path)
        except BaseException:
            locks.release()
            raise
        run = cls(cfg, state, locks)
        for folder in {Path(cfg.out).parent, Path(cfg.hdf5 or cfg.out).parent, cfg.heatmaps_dir}:
            sweep_temp_files(folder)
        run._install_signals()
        return run

    def close(self) -> None:
        """Restore signal handlers, close the state, release the locks."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        try:
            self.state.close()
            tidy_inflight(self.inflight_dir)
        finally:
            self.locks.release()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _stop(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, _stop)

    # -- planning / recording ----------------------------------------------------------------
    def plan(self, files: Sequence[Any]) -> list[Any]:
        """Files to read now (``cfg.force`` rescans all); the rest are unchanged."""
        return self.state.plan(files, self.key, force=bool(self.cfg.force)).todo

    def _record_orphans(self, *, reader_died: bool = False) -> None:
        """Error rows for files that hung or crashed a reader.

        ``reader_died``: a reader process died during this run, so an untagged in-flight log
        is a decoder crash. At the start of a run an untagged log may instead be an outside kill
        of the whole scan, so the file is blamed only when that happens twice in a row.
        """
        rows = []
        for path, reason, certain in orphaned_inflight(self.inflight_dir):
            if not (certain or reader_died or self.state.bump_suspect(path) >= SUSPECT_LIMIT):
                continue  # first time: read it again in this run
            row = {
                "path": path, "frame": 0, "image_id": "", "status": "error", "reason": reason,
                "body_part": "unknown", "model": "", "scanned_at": utc_now(), "covariates": "",
            }  # fmt: skip
            rows.append(ResultRow(row))
        if rows:
            self.state.plan([r.row["path"] for r in rows], self.key, force=True)
            self.state.record(rows, self.key)

    def record(self, result: Any) -> None:
        """Write the batch's heatmap PNGs, then commit its rows (one transaction)."""
        per_file = Counter(str(r["path"]) for r in result.rows)
        extras: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
        for chunk in result.chunks:
            pred = chunk.pred
            for k, i in enumerate(chunk.rows):
                hm = pred.heatmaps[k] if self.cfg.hdf5 is not None else None
                extras[i] = (np.asarray(pred.member_probs[k]), hm)
            self._write_pngs(result, chunk)
        results = []
        for i, row in enumerate(result.rows):
            if self.include_phi:
                row.update(phi_values(str(row["path"])))
            mp, hm = extras.get(i, (None, None))
            results.append(ResultRow(row, per_file[str(row["path"])], mp, hm))
        self.state.record(results, self.key)

    def _write_pngs(self, result: Any, chunk: Any) -> None:
        if self.cfg.heatmaps_dir is None:
            return
        from osteoscan.gradcam import overlay
        from osteoscan.writers import write_heatmap_png

        for k, i in enumerate(chunk.rows):
            row = result.rows[i]
            if row.get("heatmap") and chunk.pred.heatmaps[k] is not None:
                rgb = overlay(chunk.inputs[k], chunk.pred.heatmaps[k])
                write_heatmap_png(self.cfg.heatmaps_dir, row["image_id"], rgb)

    # -- the loop ----------------------------------------------------------------------------
    def drive(
        self,
        todo: Sequence[Any],
        loader_for: Callable[[list[Any]], Iterable[Any]],
        score: Callable[[Any], Any],
        after: Callable[[Any], None] | None = None,
    ) -> None:
        """Score and record every batch of ``todo``; survive dead reader processes."""
        remaining = list(todo)
        while remaining and self.stop_signal is None:
            try:
                for batch in loader_for(remaining):
                    result = score(batch)
                    self.record(result)
                    if after is not None:
                        after(result)
                    self._maybe_export()
                    if self.stop_signal is not None:
                        break
                return
            except RuntimeError as exc:
                # A reader process died (decoder crash or hard time limit): its in-flight log
                # names the file; record it as an error and go on with what is left.
                if "DataLoader worker" not in str(exc) or self.restarts >= MAX_LOADER_RESTARTS:
                    raise
                self.restarts += 1
                time.sleep(0.2)  # let the dead worker's log be final
                self._record_orphans(reader_died=True)
                remaining = self.state.plan(remaining, self.key, force=False).todo

    def _maybe_export(self) -> None:
        if time.monotonic() - self._last_export >= self.export_every_s:
            self.export()

    def export(self) -> list[Path]:
        """Regenerate the outputs older than the state."""
        sizes = [m.preprocess.size for m in self.models]
        written = export_outputs(
            self.state,
            self.cfg.out,
            hdf5=self.cfg.hdf5,
            classes=_union([m.ensemble.classes for m in self.models]),
            manifests={m.label: m.manifest for m in self.models},
            heatmap_size=(max(sizes), max(sizes)) if sizes else None,
            extra_columns=PHI_COLUMNS if self.include_phi else (),
        )
        self._last_export = time.monotonic()
        self.written += [p for p in written if p not in self.written]
        return written

    def finish(self) -> dict[str, int]:
        """Export, then raise if a signal stopped the run (exit 1: rerun to finish)."""
        self.export()
        if self.stop_signal is not None:
            raise OsteoscanError(
                f"stopped by {self.stop_signal} after the current batch; results so far are "
                "saved - run the same command again to finish the remaining files"
            )
        return self.state.summary()


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".<name>.")


def sweep_temp_files(folder: str | Path | None) -> int:
    """Remove temporary output files a killed run left in ``folder`` (we hold the lock)."""
    if folder is None or not Path(folder).is_dir():
        return 0
    n = 0
    for p in Path(folder).iterdir():
        if _TEMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _identity(manifest: Any) -> str:
    from osteoscan.manifest import Manifest, package_identity

    m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
    return package_identity(m)


def _union(class_lists: Iterable[Sequence[str]]) -> list[str]:
    out: list[str] = []
    for classes in class_lists:
        out.extend(c for c in classes if c not in out)
    return out
