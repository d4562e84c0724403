"""Bring results.csv, ``<stem>.flagged.csv`` and the HDF5 up to date with the scan state.

The state database (:mod:`osteoscan.scan.state`) is the source of truth; these files are views
of it, holding its rows in ``seq`` order (the order they were recorded). A night appends the
rows recorded since each file was last written; a file is rewritten whole (temporary file +
fsync + ``os.replace``) only when a stored row changed since (a rescored file, a heatmap added
later, a vanished file marked or pruned), when its columns or options changed, or when it is not
the file that was last written. The protocol that keeps a kill at any instant harmless is in
:mod:`osteoscan.scan.append`: the next run always completes the files to exactly what one
uninterrupted run writes.

Nothing is written when a file already reflects the state: a nightly run with nothing new costs
no write, not even of a large HDF5.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.rows import ResultRow, ScoredRow, redact_row, result_columns, union_classes
from osteoscan.scan.append import (
    Mark,
    Snapshot,
    append_csv,
    mark_file,
    read_mark,
    shape_of,
    write_mark,
)
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
    """Append to (or rewrite) the outputs that are behind the state; returns the paths written.

    ``classes`` (the models of this run) come first in the ``p_<class>`` columns, followed by
    classes met only in older rows. ``manifests`` (label → manifest dict) and ``heatmap_size``
    describe the HDF5; without a heatmap size the HDF5 keeps its own, or takes the first stored
    heatmap's shape. ``phi`` appends the identifier columns (``--include-phi``). ``redact`` (the
    state's secret, ``--redact-paths``) writes each path as a stable pseudonym
    (:func:`osteoscan.rows.redact`). ``force`` rewrites every file whole.
    """
    out = Path(out)
    flagged = Path(flagged) if flagged else flagged_path_for(out)
    snap = Snapshot.of(state)  # export what is committed now; a later batch is appended later
    all_classes = union_classes([list(classes), state.classes])
    tscore = state.has_tscore or any(
        (m.get("target") or {}).get("kind") == "tscore" for m in (manifests or {}).values()
    )
    columns = result_columns(all_classes, phi=phi, tscore=tscore)
    written: list[Path] = []
    for name, target, only_flagged in (("csv", out, False), ("flagged", flagged, True)):
        if _export_csv(state, name, target, columns, snap, redact, only_flagged, force):
            written.append(target)
    if hdf5 is not None:
        layout = (all_classes, max(state.max_members, 1), dict(manifests or {}))
        if _export_hdf5(state, Path(hdf5), layout, heatmap_size, snap, redact, force):
            written.append(Path(hdf5))
    return written


def _export_csv(
    state: ScanState,
    name: str,
    target: Path,
    columns: list[str],
    snap: Snapshot,
    redact: str | None,
    only_flagged: bool,
    force: bool,
) -> bool:
    """Bring one CSV up to ``snap``; True when anything was written."""
    shape = _csv_shape(columns, redact)
    mark = None if force else read_mark(state, name)
    if mark is not None and mark.current(target, snap, shape):
        return False
    if mark is not None and mark.appendable(target, snap, shape):
        torn = target.stat().st_size != mark.length  # a killed append left a partial tail
        if not torn and not state.has_rows(after=mark.seq, flagged=only_flagged):
            write_mark(state, name, mark.caught_up(snap))  # nothing of its kind came
            return False
        new = _rows(state.rows(after=mark.seq, flagged=only_flagged), redact)
        length = append_csv(target, mark.length, columns, new)
    else:
        writer = CsvResultsWriter(target, columns)
        try:
            writer.write_rows(_rows(state.rows(flagged=only_flagged), redact))
        except BaseException:
            writer.abort()  # no temporary file left behind; the previous output stays
            raise
        writer.commit()
        length = target.stat().st_size
    write_mark(state, name, mark_file(target, snap, length, shape, csv_tail=True))
    return True


def _csv_shape(columns: list[str], redact: str | None) -> str:
    return shape_of(columns, _how(redact))


def _how(redact: str | None) -> str:
    """The export options that change a file's content beyond the rows."""
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
    layout: tuple[list[str], int, dict[str, Any]],
    heatmap_size: tuple[int, int] | None,
    snap: Snapshot,
    redact: str | None,
    force: bool,
) -> bool:
    """Bring the HDF5 up to ``snap``; True when anything was written."""
    classes, n_members, manifests = layout
    mark = None if force else read_mark(state, "hdf5")
    hw = heatmap_size or (mark.hw if mark is not None else None) or _first_heatmap_shape(state)
    hw = (int(hw[0]), int(hw[1]))
    shape = shape_of(classes, n_members, manifests, hw, _how(redact))
    if mark is not None and mark.how != _how(redact):
        mark = None
    if mark is not None and mark.current(target, snap, shape):
        return False
    writer: Hdf5ResultsWriter | None = None
    after = 0
    if mark is not None and mark.appendable(target, snap, shape):
        if not state.has_rows(after=mark.seq, status="ok"):
            write_mark(state, "hdf5", mark.caught_up(snap))  # no scored row came
            return False
        write_mark(state, "hdf5", _busy(mark))  # a kill from here on: rewritten next run
        with contextlib.suppress(OSError, ValueError, KeyError):
            writer, after = Hdf5ResultsWriter.reopen(target, mark.length), mark.seq
    if writer is None:
        writer = Hdf5ResultsWriter(target, classes, n_members, hw, manifests)
    try:
        chunk: list[ScoredRow] = []
        for stored in state.stored_rows(status="ok", after=after):
            chunk.append(stored)
            if len(chunk) >= HDF5_CHUNK:
                _write_chunk(writer, chunk, redact)
                chunk = []
        _write_chunk(writer, chunk, redact)
    except BaseException:
        writer.abort()
        raise
    n_rows = writer.n_rows
    writer.commit()
    done = mark_file(target, snap, n_rows, shape, csv_tail=False, hw=hw, how=_how(redact))
    write_mark(state, "hdf5", done)
    return True


def _busy(mark: Mark) -> Mark:
    return replace(mark, busy=True)


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


def outputs_current(state: ScanState, cfg: ScanConfig, classes: Sequence[str] = ()) -> bool:
    """True when results.csv, the flagged CSV and the HDF5 (if asked for) exist, hold every
    committed row and were written with this run's options: nothing to write then."""
    redact = "on" if cfg.redact_paths else None
    columns = result_columns(union_classes([list(classes), state.classes]), phi=cfg.include_phi,
                             tscore=state.has_tscore)  # fmt: skip
    snap, shape = Snapshot.of(state), _csv_shape(columns, redact)
    for name, path in (("csv", Path(cfg.out)), ("flagged", flagged_path_for(cfg.out))):
        mark = read_mark(state, name)
        if mark is None or not mark.current(path, snap, shape):
            return False
    if cfg.hdf5 is not None:
        mark = read_mark(state, "hdf5")
        if mark is None or mark.how != _how(redact):
            return False
        return mark.current(Path(cfg.hdf5), snap, mark.shape)
    return True


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
