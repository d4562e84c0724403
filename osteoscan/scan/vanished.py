"""Files that were scanned before and are gone: their rows say ``missing`` (or ``--prune`` drops
them), instead of being reported as present.

Only files under a root of this scan are considered, and only when they no longer exist (a file
left out by ``--include``/``--exclude`` is not missing). A root that yields no file at all while
the state knows files under it is refused (exit 2): an unmounted share must never turn a whole
archive ``missing`` overnight. A missing file that comes back is scanned again like a new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from osteoscan.errors import UsageError
from osteoscan.rows import utc_now
from osteoscan.scan.state import ScanState, db_path, py_path

MISSING = "missing"


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def check_roots_not_emptied(
    known: Iterable[str], roots: Iterable[str | Path], found: set[str]
) -> None:
    """Refuse a root that now holds nothing although ``known`` files under it were scanned."""
    known = list(known)
    for root in map(str, roots):
        if any(_under(p, [root]) for p in found):
            continue
        n = sum(_under(p, [root]) for p in known)
        if n:
            raise UsageError(
                f"{root} holds no image now, but {n} files were scanned there before: is the "
                "archive mounted? Nothing was changed."
            )


def mark_vanished(
    state: ScanState,
    known: Iterable[str],
    roots: Iterable[str | Path],
    found: set[str],
    *,
    prune: bool,
) -> int:
    """Mark (or with ``prune`` delete) the rows of files under ``roots`` that no longer exist.

    ``known`` are the files the state completed before, ``found`` the paths discovered now. With
    ``prune``, rows already marked ``missing`` go too. Returns the files marked or pruned; one
    transaction.
    """
    conn, root_list = state.connection, [str(r) for r in roots]
    gone = [
        (p, conn.execute("SELECT done_at FROM files WHERE path=?", (db_path(p),)).fetchone()[0])
        for p in known
        if p not in found and _under(p, root_list) and not os.path.lexists(p)
    ]
    sql = "SELECT DISTINCT path FROM rows WHERE status=?"
    marked = [py_path(p) for (p,) in conn.execute(sql, (MISSING,))] if prune else []
    marked = [p for p in marked if _under(p, root_list)]
    if not gone and not marked:
        return 0
    now = utc_now()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for path, done_at in gone:
            key = db_path(path)
            conn.execute("DELETE FROM files WHERE path=?", (key,))  # back again: scan anew
            if prune:
                conn.execute("DELETE FROM rows WHERE path=?", (key,))
                continue
            reason = f"file not found on {now}; last scanned {done_at}"
            for frame, text in conn.execute(
                "SELECT frame, row_json FROM rows WHERE path=?", (key,)
            ).fetchall():
                row = json.loads(text)
                row["status"], row["reason"] = MISSING, reason
                conn.execute(
                    "UPDATE rows SET status=?, row_json=? WHERE path=? AND frame=?",
                    (MISSING, json.dumps(row), key, frame),
                )
        for path in marked:
            conn.execute("DELETE FROM rows WHERE path=?", (db_path(path),))
        conn.execute("UPDATE meta SET value=CAST(value AS INTEGER)+1 WHERE key='generation'")
        conn.execute("COMMIT")
    except BaseException:
        state.rollback()
        raise
    return len(gone) + len(marked)
