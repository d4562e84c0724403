"""Regenerate results.csv, ``<stem>.flagged.csv`` and the HDF5 from the scan state.

The state database (:mod:`osteoscan.scan.state`) is the source of truth; these files are views
of it, each rewritten whole through a temporary file + fsync + ``os.replace`` (the atomic writers
of :mod:`osteoscan.writers`). So a run killed at any instant leaves the previous complete files,
and a rerun rewrites them from the database: same rows, same order (path, then frame), same
``scanned_at`` per row, whatever number of runs it took to fill the database.

A file is rewritten only when the database changed since it was last written (or the file is
missing): a nightly run with nothing new costs no rewrite, not even of a large HDF5.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.rows import ResultRow, ScoredRow, redact_row, result_columns, union_classes
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.state import ScanState
from osteoscan.writers import (
    CsvResultsWriter,
    Hdf5ResultsWriter,
    flagged_path_for,
    write_heatmap_png,
)

REDACT_META = "redact_secret"
HDF5_CHUNK = 256  # rows per HDF5 write: bounded memory over any archive size


def export_outputs(
    state: ScanState,
    out: str | Path,
    *,
    flagged: str | Path | None = None,
    hdf5: str | Path | None = None,
    classes: Sequence[str] = (),
    manifests: Mapping[str, Mapping[str, Any]] | None = None,
    heatmap_size: tuple[int, int] | None = None,
    phi: bool = False,
    redact: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Rewrite the outputs that are older than the state; returns the paths rewritten.

    ``classes`` (the models of this run) come first in the ``p_<class>`` columns, followed by
    classes met only in older rows. ``manifests`` (label → manifest dict) and ``heatmap_size``
    describe the HDF5; without a heatmap size the first stored heatmap's shape is used.
    ``phi`` appends the identifier columns (``--include-phi``). ``redact`` (the state's secret,
    ``--redact-paths``) writes each path as a stable pseudonym (:func:`osteoscan.rows.redact`).
    """
    out = Path(out)
    flagged = Path(flagged) if flagged else flagged_path_for(out)
    gen = state.generation  # export what is committed now; a later batch re-marks it stale
    all_classes = union_classes([list(classes), state.classes])
    how = _how(redact)
    written: list[Path] = []
    if force or state.needs_export("csv", out, how) or state.needs_export("flagged", flagged, how):
        writer = CsvResultsWriter(out, result_columns(all_classes, phi=phi), flagged)
        try:
            writer.write_rows(_rows(state.rows(), redact))
            written += list(writer.commit())
        except BaseException:
            writer.abort()  # no temporary file left behind; the previous outputs stay
            raise
        state.mark_exported("csv", gen, how)
        state.mark_exported("flagged", gen, how)
    if hdf5 is not None and (force or state.needs_export("hdf5", hdf5, how)):
        target = Path(hdf5)
        written.append(_export_hdf5(state, target, all_classes, manifests or {}, heatmap_size,
                                    redact))  # fmt: skip
        state.mark_exported("hdf5", gen, how)
    return written


def _how(redact: str | None) -> str:
    """The export options that change a file's content beyond the rows (see needs_export)."""
    return ":redacted" if redact else ""


def _rows(rows: Iterable[ResultRow], redact: str | None) -> Iterator[ResultRow]:
    for row in rows:
        yield redact_row(row, redact) if redact else row


def _row_classes(row: ResultRow, n: int) -> list[str]:
    """The classes of the model that scored ``row``, in row order (``n`` of them if known)."""
    names = list(row.probs)
    return names[:n] if n else names


def _first_heatmap_shape(state: ScanState) -> tuple[int, int]:
    for stored in state.stored_rows(status="ok"):
        if stored.heatmap is not None:
            return int(stored.heatmap.shape[0]), int(stored.heatmap.shape[1])
    return (1, 1)


def _export_hdf5(
    state: ScanState,
    target: Path,
    classes: list[str],
    manifests: Mapping[str, Mapping[str, Any]],
    heatmap_size: tuple[int, int] | None,
    redact: str | None,
) -> Path:
    hw = heatmap_size or _first_heatmap_shape(state)
    writer = Hdf5ResultsWriter(target, classes, max(state.max_members, 1), hw, manifests)
    try:
        chunk: list[ScoredRow] = []
        for stored in state.stored_rows(status="ok"):
            chunk.append(stored)
            if len(chunk) >= HDF5_CHUNK:
                _write_chunk(writer, chunk, redact)
                chunk = []
        _write_chunk(writer, chunk, redact)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def _write_chunk(writer: Hdf5ResultsWriter, chunk: list[ScoredRow], redact: str | None) -> None:
    if not chunk:
        return
    n_cls, n_mem = len(writer.classes), writer.n_members
    probs = np.full((len(chunk), n_cls), np.nan, np.float32)
    members = np.full((len(chunk), n_mem, n_cls), np.nan, np.float32)
    for i, stored in enumerate(chunk):
        mp = stored.member_probs
        row_classes = _row_classes(stored.row, 0 if mp is None else int(mp.shape[-1]))
        p = np.array([stored.row.probs[c] for c in row_classes], np.float32)
        m = mp if mp is not None else p[None, :]
        a_p, a_m = writer.align(row_classes, p[None, :], np.asarray(m, np.float32)[None])
        probs[i], members[i] = a_p[0], a_m[0]
    heatmaps = [None if s.heatmap is None else np.asarray(s.heatmap, np.float32) for s in chunk]
    writer.write([redact_row(s.row, redact) if redact else s.row for s in chunk], probs, members,
                 heatmaps, [s.geometry for s in chunk])  # fmt: skip


def outputs_current(state: ScanState, cfg: ScanConfig) -> bool:
    """True when results.csv, the flagged CSV and the HDF5 (if asked for) exist and reflect
    every committed row: a run with nothing to score then has nothing to write either."""
    targets = [("csv", cfg.out), ("flagged", flagged_path_for(cfg.out))]
    if cfg.hdf5 is not None:
        targets.append(("hdf5", cfg.hdf5))
    how = _how("on" if cfg.redact_paths else None)
    return not any(state.needs_export(name, path, how) for name, path in targets)


def redaction_secret(state: ScanState, cfg: ScanConfig) -> str | None:
    """The key of the path pseudonyms (``--redact-paths``): made once, kept only in the state."""
    if not cfg.redact_paths:
        return None
    secret = state.meta(REDACT_META)
    if not secret:
        secret = secrets.token_hex(16)
        state.set_meta(REDACT_META, secret)
    return secret


def write_heatmap_pngs(scored: Sequence[ScoredRow], folder: str | Path | None) -> None:
    """Overlay PNGs for the rows of a batch that name one: drawn on the radiograph (the model's
    region outlined), or on the model input when its geometry has no inverse (``knee_pair``)."""
    if folder is None:
        return
    from osteoscan.geometry import overlay_on_source
    from osteoscan.gradcam import overlay

    for item in scored:
        if not item.row.heatmap or item.heatmap is None:
            continue
        if item.geometry is not None and item.display is not None:
            rgb = overlay_on_source(item.display, item.heatmap, item.geometry)
        elif item.model_input is not None:
            rgb = overlay(item.model_input, item.heatmap)
        else:
            continue
        write_heatmap_png(folder, item.row.image_id, rgb)
