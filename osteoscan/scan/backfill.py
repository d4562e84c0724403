"""Heatmaps for rows already scored: output options never rescore.

Scores do not depend on ``--hdf5`` or ``--heatmaps``, so the run key leaves them out. When a
nightly run asks for heatmaps that earlier runs did not make, :func:`paths_missing_heatmaps`
names the files whose current rows lack them; those files go through load and score again and
:func:`attach_heatmaps` adds only the maps (and PNG paths), keeping each row's scores and
``scanned_at``. :func:`heatmap_options` is what the state remembers to skip this check when the
options did not change since the last complete run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from osteoscan.rows import ScoredRow
from osteoscan.scan.blobs import encode_array
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.state import ScanState, db_path, py_path
from osteoscan.writers import heatmap_name

META_KEY = "heatmap_options"


def heatmap_options(cfg: ScanConfig) -> str:
    """The heatmap-related options of ``cfg``, as stored in the state after a complete run."""
    blob = cfg.hdf5 is not None and cfg.hdf5_heatmaps
    png = str(Path(cfg.heatmaps_dir).resolve()) if cfg.heatmaps_dir else ""
    return json.dumps([blob, png, cfg.heatmaps_for if png else ""])


def paths_missing_heatmaps(
    state: ScanState, key: str, *, blob: bool, png_dir: str | None, png_all: bool
) -> set[str]:
    """Files whose current rows (scored under ``key``) lack a heatmap the options now want:
    a stored map for the HDF5 (``blob``), or a PNG in ``png_dir`` for flagged (or all) rows."""
    conn, out = state.connection, set[str]()
    sql = ("SELECT path, image_id, flagged, heatmap IS NULL, row_json FROM rows "
           "WHERE status='ok' AND run_key=?")  # fmt: skip
    for stored, image_id, flagged, no_blob, text in conn.execute(sql, (key,)):
        path = py_path(stored)
        if blob and no_blob:
            out.add(path)
        elif png_dir and (png_all or flagged):
            want = str(Path(png_dir) / heatmap_name(image_id))
            if json.loads(text).get("heatmap") != want or not os.path.exists(want):
                out.add(path)
    return out


def attach_heatmaps(state: ScanState, items: Sequence[ScoredRow]) -> int:
    """Add heatmaps (the stored map and/or the PNG path) to rows already recorded, keeping
    their scores and ``scanned_at``; one transaction. Returns the rows updated."""
    conn, n = state.connection, 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in items:
            got = conn.execute(
                "SELECT row_json FROM rows WHERE path=? AND frame=? AND status='ok'",
                (db_path(item.row.path), item.row.frame),
            ).fetchone()
            if got is None:
                continue
            stored = json.loads(got[0])
            stored["heatmap"] = item.row.heatmap or stored.get("heatmap")
            hm, hm_shape = encode_array(item.heatmap, "float16", compress=True)
            conn.execute(
                "UPDATE rows SET row_json=?, heatmap=COALESCE(?, heatmap), "
                "heatmap_shape=COALESCE(?, heatmap_shape) WHERE path=? AND frame=?",
                (json.dumps(stored), hm, hm_shape, db_path(item.row.path), item.row.frame),
            )
            n += 1
        conn.execute("UPDATE meta SET value=CAST(value AS INTEGER)+1 WHERE key='generation'")
        conn.execute("COMMIT")
    except BaseException:
        state.rollback()
        raise
    return n
