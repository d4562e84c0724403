"""The discover and plan stages: which files exist, and which of them need reading now.

- :func:`discover_files` walks the paths (:func:`osteoscan.discover.discover`, content-sniffed).
- :func:`run_key_for` derives "what would score a file" from the package manifests alone (no
  torch, no weights) and the row-changing options: a nightly run over an unchanged archive learns
  that nothing needs scoring before it pays for loading a model.
- :func:`record_orphans` turns files that crashed or hung a reader (in-flight logs left by dead
  processes, :mod:`osteoscan.guards`) into ``error`` rows, so they are not read again forever.
- :func:`plan_files` asks the state which files are new or changed (one ``stat`` each).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from osteoscan.discover import Found, discover, recheck
from osteoscan.guards import orphaned_inflight
from osteoscan.hashing import file_sha256
from osteoscan.manifest import Manifest, package_identity
from osteoscan.rows import ResultRow, ScoredRow
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.state import ScanState

SUSPECT_LIMIT = 2  # runs that died while reading the same file before it is an error row


def discover_files(
    cfg: ScanConfig, known: Mapping[str, tuple[int, int]] | None = None
) -> tuple[list[Found], int]:
    """Files that become rows (``ignored`` entries dropped) and how many were ignored.

    With ``known`` (:meth:`ScanState.signatures`), files whose size and mtime equal those of
    their last completed scan are not opened (:data:`osteoscan.discover.UNCHECKED`): an unchanged
    file costs one ``stat``.
    """
    unchanged = None
    if known is not None:

        def unchanged(path: str, size: int, mtime_ns: int) -> bool:
            return known.get(path) == (size, mtime_ns)

    files, ignored = [], 0
    for f in discover(cfg.paths, cfg.include, cfg.exclude, unchanged):
        if f.kind == "ignored":
            ignored += 1
        else:
            files.append(f)
    return files, ignored


def _digest(path: str | Path | None) -> str | None:
    if not path:
        return None
    try:
        return file_sha256(path)[:16]
    except OSError:
        return None


def run_key(package_ids: Sequence[str], options: Mapping[str, Any] | None = None) -> str:
    """Stable key of "what would score a file": package identities + row-changing options.

    ``package_ids`` come from ``osteoscan.package.package_identity``; ``options`` holds anything
    else that changes a score (threshold override, ``--body-part``, covariates CSV hash). Order of
    packages does not matter; the options must be JSON-serialisable.
    """
    payload = json.dumps(
        {"packages": sorted(package_ids), "options": dict(options or {})},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def run_key_for(cfg: ScanConfig, manifests: Sequence[Manifest]) -> str:
    """The run key of ``cfg`` with these packages (:func:`run_key`).

    Output options (HDF5, heatmaps, path redaction) are not part of it: scores never depend on
    them, so adding ``--hdf5`` or ``--heatmaps`` to a nightly run computes only the heatmaps
    that are missing (:meth:`ScanState.paths_missing_heatmaps`), never new scores.
    """
    return run_key(
        [package_identity(m) for m in manifests],
        {
            "threshold": cfg.threshold,
            # "auto" changed meaning after 0.1.0 (files stating no part take the single served
            # part instead of being skipped): a new key rescans rows stored under the old one.
            "body_part": "auto/single-part" if cfg.body_part == "auto" else cfg.body_part,
            "covariates": _digest(cfg.covariates),
            "covariate_columns": list(cfg.covariate_columns),
            "include_phi": cfg.include_phi,
        },
    )


def record_orphans(
    state: ScanState,
    inflight_dir: Path,
    key: str,
    *,
    reader_died: bool = False,
    rename: Callable[[str], str] | None = None,
) -> list[str]:
    """Record ``error`` rows for files that hung or crashed a reader; returns their paths.

    ``reader_died``: a reader process died during this run, so an untagged in-flight log is a
    decoder crash. At the start of a run an untagged log may instead be an outside kill of the
    whole scan, so the file is blamed only when that happens twice in a row. ``rename`` maps
    the path read to the row's path (a DICOMweb source reads a cached copy of the instance).
    """
    rows = []
    for read_path, reason, certain in orphaned_inflight(inflight_dir):
        path = rename(read_path) if rename is not None else read_path
        if not (certain or reader_died or state.bump_suspect(path) >= SUSPECT_LIMIT):
            continue  # first time: read it again in this run
        rows.append(ScoredRow(ResultRow.error(path, reason)))
    if rows:
        state.plan([r.row.path for r in rows], key, force=True)
        state.record(rows, key)
    return [r.row.path for r in rows]


def plan_files(state: ScanState, files: Sequence[Found], key: str, force: bool) -> list[Found]:
    """Files to read now: new, changed, interrupted or scored under another key (all if force).

    Files the walk did not open (unchanged content, but e.g. a new model) are sniffed now.
    """
    return [recheck(f) for f in state.plan(files, key, force=force).todo]
