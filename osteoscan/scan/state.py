"""Incremental, crash-safe scan state in SQLite: the source of truth for every output.

A nightly scan must only do new work, and a run killed at any instant must neither lose nor
duplicate rows. Both follow from one rule: **finished rows are committed here first, one
transaction per batch, and the CSV / flagged CSV / HDF5 are regenerated from it** (temp file +
fsync + ``os.replace``). A SIGKILL leaves the previous outputs untouched and every batch committed
before it; the next run plans only the files not marked done, then rewrites the outputs.

Identity: ``image_id`` per row (SOPInstanceUID [+ ``:frame``], else a content hash; never PHI);
the *run key* (:func:`osteoscan.scan.plan.run_key`: packages + options that change a score); and
``(size, mtime_ns)`` per file. A file is skipped when its stat and the run key equal those stored
when it was last *completed* (all frames recorded); anything else is planned again.

Schema (``PRAGMA user_version = 3``; older files are migrated in place: 1 → 2 drops the unused
``files.sha256`` and adds ``rows.geometry``; 2 → 3 adds ``rows.seq``, numbering existing rows in
their old output order, path then frame)::

    meta(key TEXT PRIMARY KEY, value TEXT)            -- generation counter, export marks,
                                                      -- union of classes, max member count,
                                                      -- next_seq, edits (see below)
    files(path TEXT PRIMARY KEY,                      -- path string exactly as found
          size INTEGER, mtime_ns INTEGER,             -- stat taken at plan time, before reading
          run_key TEXT, n_frames INTEGER, done_at TEXT)
    rows(path TEXT, frame INTEGER,                    -- PRIMARY KEY (path, frame): no duplicates
         image_id TEXT, run_key TEXT, status TEXT, flagged INTEGER, score REAL,
         row_json TEXT,                               -- the finished CSV row dict
         member_probs BLOB, member_shape TEXT,        -- float32 (M, C), raw bytes
         heatmap BLOB, heatmap_shape TEXT,            -- float16 (h, w), zlib-compressed
         scanned_at TEXT,                             -- time the row was scored; never rewritten
         gen INTEGER,                                 -- generation of the batch that wrote it
         geometry TEXT,                               -- JSON InputGeometry of the model input
         seq INTEGER)                                 -- output order: when the row was recorded

Output order and appending: each recorded row takes the next ``seq`` (a counter that never goes
back), so the outputs can grow by appending the rows past the last ``seq`` they hold. Any change
to a row already stored (a rescored file, a heatmap attached later, a vanished file marked or
pruned) bumps the ``edits`` counter through triggers; an output written before such a change is
rewritten whole instead of appended to (:mod:`osteoscan.scan.export`).

Rows of vanished files stay (a log of what was screened); a changed file's rows are replaced.

Durability: WAL + ``synchronous=FULL``: a kill loses nothing committed, and the per-commit fsync
(one per batch) means a power loss cannot roll back rows that already reached a regenerated CSV.
Only one process writes (see :mod:`osteoscan.scan.lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from osteoscan.atomic import refuse_symlink
from osteoscan.errors import OutputError
from osteoscan.geometry import InputGeometry
from osteoscan.rows import ResultRow, ScoredRow, utc_now
from osteoscan.scan.blobs import decode_array, encode_array, json_default

SCHEMA_VERSION = 3
# SQLite result codes that mean "the disk or its permissions", not a bug: SQLITE_READONLY (8),
# SQLITE_IOERR (10), SQLITE_FULL (13), SQLITE_CANTOPEN (14), with their extended codes (low byte).
_OUTPUT_ERRORCODES = frozenset({8, 10, 13, 14})
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    run_key TEXT NOT NULL, n_frames INTEGER NOT NULL, done_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows(
    path TEXT NOT NULL, frame INTEGER NOT NULL, image_id TEXT NOT NULL, run_key TEXT NOT NULL,
    status TEXT NOT NULL, flagged INTEGER NOT NULL, score REAL, row_json TEXT NOT NULL,
    member_probs BLOB, member_shape TEXT, heatmap BLOB, heatmap_shape TEXT,
    scanned_at TEXT NOT NULL, gen INTEGER NOT NULL, geometry TEXT, seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(path, frame));
CREATE INDEX IF NOT EXISTS rows_seq ON rows(seq);
CREATE TRIGGER IF NOT EXISTS rows_updated AFTER UPDATE ON rows BEGIN
    INSERT OR REPLACE INTO meta(key, value) VALUES ('edits',
        COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key='edits'), 0) + 1);
END;
CREATE TRIGGER IF NOT EXISTS rows_deleted AFTER DELETE ON rows BEGIN
    INSERT OR REPLACE INTO meta(key, value) VALUES ('edits',
        COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key='edits'), 0) + 1);
END;
"""

# 2 → 3: number the existing rows in their old output order (path, then frame).
_MIGRATE_SEQ = """
ALTER TABLE rows ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
CREATE TEMP TABLE seq_order(r INTEGER PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO seq_order SELECT rowid, ROW_NUMBER() OVER (ORDER BY path, frame) FROM rows;
UPDATE rows SET seq = (SELECT n FROM seq_order WHERE r = rows.rowid);
INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', (SELECT COUNT(*) + 1 FROM rows));
DROP TABLE seq_order;
"""


def db_path(path: str) -> str | bytes:
    """A path as stored in the database: the text itself, or, for a name that is not valid
    UTF-8 (bytes a POSIX file system allows), its raw bytes as a BLOB (never equal to any text)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def py_path(value: str | bytes) -> str:
    """The path of a stored value (the inverse of :func:`db_path`)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _suspect_key(path: str) -> str:
    return "suspect:" + os.fsencode(path).decode("utf-8", "backslashreplace")


def default_state_path(out: str | Path) -> Path:
    """``results.csv`` → ``results.state.sqlite`` next to it (the default of ``--state``)."""
    out = Path(out)
    return out.with_name(out.stem + ".state.sqlite")


@dataclass(frozen=True)
class FileSig:
    """What a file looked like when planned: enough to tell "unchanged" without reading it."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> FileSig | None:
        """``stat`` the file; ``None`` when it vanished or cannot be stat'ed."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_size, st.st_mtime_ns)


@dataclass
class Plan(Generic[T]):
    """Outcome of :meth:`ScanState.plan`: the items to read and score, and the ones skipped."""

    todo: list[T] = field(default_factory=list)
    unchanged: list[T] = field(default_factory=list)
    unchanged_rows: int = 0


class ScanState:
    """The SQLite store of one ``--out`` (see the module docstring for schema and guarantees)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._planned: dict[str, FileSig] = {}
        self._frames_seen: dict[str, set[int]] = {}
        self._counts = {"new": 0, "ok": 0, "skipped": 0, "failed": 0, "flagged": 0}
        self._plan_counts = {"unchanged": 0, "unchanged_rows": 0, "todo": 0}

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> ScanState:
        """Open (creating when needed) the state database at ``path``."""
        path = Path(path)
        for suffix in ("", "-wal", "-shm", "-journal"):  # SQLite would write through a link
            refuse_symlink(f"{path}{suffix}", "scan state file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # Replaced rows are zeroed, not left in free pages: a rescan without --include-phi
            # must not leave identifiers of an earlier --include-phi run inside the file.
            conn.execute("PRAGMA secure_delete=ON")
            # A REPLACE that removes a stored row fires the delete trigger (the ``edits`` mark)
            conn.execute("PRAGMA recursive_triggers=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:  # 0.1: files.sha256 was never filled; drop it
                conn.execute("DROP INDEX IF EXISTS rows_image")
                conn.execute("ALTER TABLE files DROP COLUMN sha256")
                conn.execute("ALTER TABLE rows ADD COLUMN geometry TEXT")
            if version in (1, 2):
                conn.executescript(_MIGRATE_SEQ)
            elif version not in (0, SCHEMA_VERSION):
                raise OutputError(
                    f"state file {path} has schema version {version}, this osteoscan knows "
                    f"{SCHEMA_VERSION}; use another --state file or upgrade osteoscan"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise OutputError(f"cannot open the scan state {path}: {exc}") from exc
        except OSError as exc:
            raise OutputError(f"cannot create the scan state {path}: {exc.strerror}") from exc
        return cls(path, conn)

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL back into the main file)."""
        # a failed checkpoint loses nothing: the WAL is replayed on next open
        with contextlib.suppress(sqlite3.DatabaseError):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def __enter__(self) -> ScanState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta --------------------------------------------------------------------------------
    @property
    def connection(self) -> sqlite3.Connection:
        """The database connection, for queries of other modules of this package."""
        return self._conn

    def rollback(self) -> None:
        """Roll back an open transaction (nothing happens when none is open)."""
        self._rollback()

    def meta(self, key: str, default: str | None = None) -> str | None:
        """A value of the ``meta`` table (``default`` when unset)."""
        return self._meta(key, default)

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the ``meta`` table (its own transaction)."""
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def generation(self) -> int:
        """Counter bumped by every :meth:`record` transaction (tells writers whether to rewrite)."""
        return int(self._meta("generation", "0") or 0)

    @property
    def last_seq(self) -> int:
        """``seq`` of the row recorded last (0 when none): outputs holding it are complete."""
        return int(self._meta("next_seq", "1") or 1) - 1

    @property
    def edits(self) -> int:
        """Counter of changes to rows already stored (see the module docstring)."""
        return int(self._meta("edits", "0") or 0)

    @property
    def classes(self) -> list[str]:
        """Union of the ``p_<class>`` columns of all stored rows, in first-seen order."""
        return list(json.loads(self._meta("classes", "[]") or "[]"))

    @property
    def has_tscore(self) -> bool:
        """True once a row with a predicted T-score was stored (the ``tscore`` column)."""
        return self._meta("tscore") == "1"

    @property
    def max_members(self) -> int:
        """Largest ensemble (member count) among stored rows: the HDF5 member axis."""
        return int(self._meta("max_members", "0") or 0)

    def needs_export(self, name: str, target: str | Path | None = None, how: str = "") -> bool:
        """True when output ``name`` is older than the rows, was written another way (``how``:
        a signature of the export options, e.g. path redaction) or ``target`` is missing."""
        if target is not None and not Path(target).exists():
            return True
        return self._meta(f"exported:{name}") != f"{self.generation}{how}"

    def mark_exported(self, name: str, generation: int | None = None, how: str = "") -> None:
        """Remember that output ``name`` reflects ``generation`` (call after ``os.replace``)."""
        gen = self.generation if generation is None else generation
        self.set_meta(f"exported:{name}", f"{gen}{how}")

    def bump_suspect(self, path: str) -> int:
        """Count one more run that died while reading ``path``; returns the count so far.

        The count resets when the file is recorded (read to the end) by a later run.
        """
        key = _suspect_key(path)
        hits = int(self._meta(key, "0") or 0) + 1
        self._conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(hits))
        )
        return hits

    # -- planning ----------------------------------------------------------------------------
    def plan(self, found: Iterable[T], run_key: str, force: bool = False) -> Plan[T]:
        """Split discovered items into those to (re)scan and those unchanged since last time.

        ``found`` items are anything with a ``.path`` (``osteoscan.discover.Found``) or plain
        paths. Costs one ``stat`` per file and one indexed lookup: nothing is read or decoded.
        """

        def get_path(item: T) -> str:
            return str(getattr(item, "path", item))

        known = {
            py_path(p): (s, m, k, n)
            for p, s, m, k, n in self._conn.execute(
                "SELECT path, size, mtime_ns, run_key, n_frames FROM files"
            )
        }
        plan: Plan[T] = Plan()
        for item in found:
            path = get_path(item)
            seen = getattr(item, "signature", None)  # the walk's own stat, when it has one
            sig = FileSig(*seen) if seen else FileSig.of(path) or FileSig(-1, -1)
            self._planned[path] = sig
            prev = known.get(path)
            if (
                not force
                and prev is not None
                and prev[2] == run_key
                and (prev[0], prev[1]) == (sig.size, sig.mtime_ns)
                and sig.size >= 0
            ):
                plan.unchanged.append(item)
                plan.unchanged_rows += prev[3]
            else:
                plan.todo.append(item)
        self._plan_counts["unchanged"] += len(plan.unchanged)
        self._plan_counts["unchanged_rows"] += plan.unchanged_rows
        self._plan_counts["todo"] += len(plan.todo)
        return plan

    # -- recording ---------------------------------------------------------------------------
    def record(self, results: Sequence[ScoredRow], run_key: str) -> int:
        """Commit one batch of finished rows in a single transaction; returns the generation.

        A file whose ``file_frames`` rows have all been recorded in this run is marked done with
        the stat taken at plan time (a file modified while being read is thus rescanned next
        time). Frames of a done file beyond ``file_frames`` (left from an older version) go.
        """
        if not results:
            return self.generation
        try:
            return self._record(results, run_key)
        except sqlite3.OperationalError as exc:
            self._rollback()  # the whole batch or nothing
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _OUTPUT_ERRORCODES:
                raise OutputError(
                    f"cannot write the scan state {self.path}: {exc}; rows committed before "
                    "this batch are intact - free space or fix permissions and re-run"
                ) from exc
            raise
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.DatabaseError):
            self._conn.execute("ROLLBACK")

    def _record(self, results: Sequence[ScoredRow], run_key: str) -> int:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        gen = self.generation + 1
        seq = self.last_seq
        done: list[tuple[str, int]] = []
        # frame bookkeeping and counters change only once the transaction has committed
        seen_now = {p: set(f) for p, f in self._frames_seen.items()}
        statuses: list[tuple[str, bool]] = []
        classes = self.classes
        n_members = self.max_members
        tscore = self.has_tscore
        for res in results:
            row = res.row
            path, frame = row.path, row.frame
            mp, mp_shape = encode_array(res.member_probs, "float32", compress=False)
            hm, hm_shape = encode_array(res.heatmap, "float16", compress=True)
            flagged = row.is_flagged
            seq += 1
            conn.execute(
                "INSERT OR REPLACE INTO rows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    db_path(path), frame, row.image_id, run_key, row.status, int(flagged),
                    row.score, json.dumps(row.as_dict(), default=json_default), mp, mp_shape, hm,
                    hm_shape, row.scanned_at, gen,
                    json.dumps(res.geometry.to_dict()) if res.geometry else None, seq,
                ),
            )  # fmt: skip
            seen = seen_now.setdefault(path, set())
            seen.add(frame)
            if len(seen) >= res.file_frames:
                done.append((path, res.file_frames))
            statuses.append((row.status, flagged))
            classes += [c for c in row.probs if c not in classes]
            if res.member_probs is not None:
                n_members = max(n_members, int(np.shape(res.member_probs)[0]))
            tscore = tscore or getattr(row, "tscore", None) is not None
        now = utc_now()
        for path, n_frames in done:
            sig = self._planned.get(path) or FileSig.of(path) or FileSig(-1, -1)
            conn.execute("DELETE FROM rows WHERE path=? AND frame>=?", (db_path(path), n_frames))
            conn.execute("DELETE FROM meta WHERE key=?", (_suspect_key(path),))
            conn.execute(
                "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                (db_path(path), sig.size, sig.mtime_ns, run_key, n_frames, now),
            )
            seen_now.pop(path, None)
        for key, value in (
            ("generation", str(gen)),
            ("next_seq", str(seq + 1)),
            ("classes", json.dumps(classes)),
            ("max_members", str(n_members)),
            ("tscore", "1" if tscore else "0"),
        ):
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
        conn.execute("COMMIT")
        self._frames_seen = seen_now
        for status, flagged in statuses:
            self._count(status, flagged)
        return gen

    def _count(self, status: str, flagged: bool) -> None:
        self._counts["new"] += 1
        key = "failed" if status == "error" else status
        if key in self._counts:
            self._counts[key] += 1
        if flagged:
            self._counts["flagged"] += 1

    # -- reading back ------------------------------------------------------------------------
    def rows(self, *, after: int = 0, flagged: bool = False) -> Iterator[ResultRow]:
        """Stored rows in output order (``seq``: the order they were recorded), those past
        ``after`` only; with ``flagged``, the flagged rows alone."""
        sql = "SELECT row_json FROM rows WHERE seq>?" + (" AND flagged=1" if flagged else "")
        for (text,) in self._conn.execute(sql + " ORDER BY seq", (after,)):
            yield ResultRow.from_dict(json.loads(text))

    def has_rows(self, *, after: int = 0, flagged: bool = False, status: str | None = None) -> bool:
        """True when a row past ``after`` exists (flagged / with ``status`` only, if given)."""
        sql = "SELECT 1 FROM rows WHERE seq>?" + (" AND flagged=1" if flagged else "")
        args: tuple[Any, ...] = (after,) if status is None else (after, status)
        sql += "" if status is None else " AND status=?"
        return self._conn.execute(sql + " LIMIT 1", args).fetchone() is not None

    def stored_rows(self, *, status: str | None = None, after: int = 0) -> Iterator[ScoredRow]:
        """Rows with their member probabilities and heatmaps (for the HDF5), in output order,
        those past ``after`` only."""
        sql = ("SELECT row_json, member_probs, member_shape, heatmap, heatmap_shape, geometry "
               "FROM rows WHERE seq>?")  # fmt: skip
        args: tuple[Any, ...] = (after,)
        if status is not None:
            sql += " AND status=?"
            args = (after, status)
        for text, mp, mps, hm, hms, geo in self._conn.execute(sql + " ORDER BY seq", args):
            yield ScoredRow(
                ResultRow.from_dict(json.loads(text)),
                1,
                decode_array(mp, mps, "float32", compressed=False),
                decode_array(hm, hms, "float16", compressed=True),
                geometry=InputGeometry.from_dict(json.loads(geo)) if geo else None,
            )

    def signatures(self) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of every file completed so far, by path (the walk's memory)."""
        sql = "SELECT path, size, mtime_ns FROM files"
        return {py_path(p): (size, mtime) for p, size, mtime in self._conn.execute(sql)}

    def totals(self) -> dict[str, int]:
        """What the results hold now (all runs): rows, ``ok``/``skipped``/``error``, ``flagged``."""
        out = {"rows": 0, "ok": 0, "skipped": 0, "error": 0, "missing": 0, "flagged": 0}
        sql = "SELECT status, COUNT(*), SUM(flagged) FROM rows GROUP BY status"
        for status, n, flagged in self._conn.execute(sql):
            out[status] = out.get(status, 0) + int(n)
            out["rows"] += int(n)
            out["flagged"] += int(flagged or 0)
        return out

    def n_rows(self) -> int:
        """Number of rows stored (all runs)."""
        return int(self._conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def summary(self) -> dict[str, int]:
        """Counts of this session: rows ``new`` (scored/recorded now) of which ``ok`` /
        ``skipped`` / ``failed`` / ``flagged``; files ``unchanged`` (skipped without reading)
        and their rows ``unchanged_rows``; ``todo`` files planned; ``total_rows`` stored."""
        return {**self._counts, **self._plan_counts, "total_rows": self.n_rows()}
