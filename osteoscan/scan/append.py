"""Append-only outputs: what each output holds, recorded in the state, and appending in place.

A night's cost must follow the night's new rows, not everything ever scanned, so results.csv,
the flagged CSV and the HDF5 grow by appending the rows recorded since they were last written
(rows carry a ``seq``, the order they were recorded: :mod:`osteoscan.scan.state`).

The protocol, per output, makes a kill at any instant harmless:

1. A :class:`Mark` in the state's ``meta`` table says what the file held when it was last
   completed: the state's generation, ``edits`` counter and last ``seq`` then, the file's length
   (bytes for a CSV, rows for the HDF5), size, inode and, for a CSV, a digest of its last 4 KB.
2. To append, the file must still be that file (inode, size at least the length, same tail),
   written with the same columns/classes/options (``shape``), and no stored row may have changed
   since (``edits``). Anything past the recorded length (a killed append) is cut off first, then
   the new rows are written and fsynced, and only then is the new mark committed. A kill before
   the commit leaves the old mark: the next run cuts the partial tail and appends again.
3. The HDF5 cannot be cut back safely after a torn write (its metadata is not journaled), so its
   mark is set ``busy`` before an append and cleared after: a file whose append was interrupted
   is rewritten whole.
4. Otherwise the output is rewritten whole (temporary file + fsync + rename), then marked.

Either way the file ends up equal to what one uninterrupted run writes: the stored rows in
``seq`` order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from osteoscan.atomic import output_error
from osteoscan.rows import ResultRow
from osteoscan.scan.state import ScanState

TAIL_BYTES = 4096  # bytes before the recorded length that must be unchanged to append
_CSV_CHUNK = 512  # rows encoded per write: bounded memory over any night


@dataclass(frozen=True)
class Snapshot:
    """The state's counters at the start of an export (what the outputs will reflect)."""

    gen: int
    edits: int
    seq: int

    @classmethod
    def of(cls, state: ScanState) -> Snapshot:
        """The counters of ``state`` now."""
        return cls(state.generation, state.edits, state.last_seq)


@dataclass(frozen=True)
class Mark:
    """What an output held when it was last completed (stored as JSON in the state's meta)."""

    gen: int
    edits: int
    seq: int
    length: int  # bytes (CSV) or rows (HDF5) written
    size: int
    ino: int
    shape: str  # digest of the columns / classes / options the file was written with
    tail: str = ""  # CSV: sha256 of the TAIL_BYTES before ``length``
    busy: bool = False  # HDF5: an append was started and not finished
    hw: tuple[int, int] = (0, 0)  # HDF5: heatmap height and width
    how: str = ""  # HDF5: export options beyond the layout (path redaction)

    def current(self, target: Path, snap: Snapshot, shape: str) -> bool:
        """True when the file on disk already reflects ``snap`` (nothing to write)."""
        return (
            self.gen == snap.gen and self.shape == shape and not self.busy
            and _stat_id(target) == (self.ino, self.size)
        )  # fmt: skip

    def caught_up(self, snap: Snapshot) -> Mark:
        """This mark moved to ``snap`` when no row of the file's kind came since."""
        return replace(self, gen=snap.gen, edits=snap.edits, seq=snap.seq)

    def appendable(self, target: Path, snap: Snapshot, shape: str) -> bool:
        """True when rows past ``seq`` can be appended to ``target`` (see the module docstring)."""
        if self.busy or self.shape != shape or self.edits != snap.edits or self.seq > snap.seq:
            return False
        found = _stat_id(target)
        if found is None or found[0] != self.ino or found[1] < self.length:
            return False
        return not self.tail or _tail_digest(target, self.length) == self.tail


def shape_of(*parts: Any) -> str:
    """A short digest of what fixes an output's layout (columns, classes, options)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_mark(state: ScanState, name: str) -> Mark | None:
    """The mark of output ``name`` (``csv``, ``flagged``, ``hdf5``), if one was recorded."""
    text = state.meta(f"output:{name}")
    if not text:
        return None
    try:
        raw = json.loads(text)
        raw["hw"] = tuple(raw.get("hw", (0, 0)))
        return Mark(**raw)
    except (ValueError, TypeError):
        return None  # unreadable mark (another version): the output is rewritten


def write_mark(state: ScanState, name: str, mark: Mark) -> None:
    """Record ``mark`` for output ``name`` (one committed statement)."""
    state.set_meta(f"output:{name}", json.dumps(asdict(mark)))


def mark_file(
    target: Path, snap: Snapshot, length: int, shape: str, *, csv_tail: bool, **extra: Any
) -> Mark:
    """The mark of ``target`` as it is now on disk, holding the rows up to ``snap``."""
    st = os.stat(target)
    tail = _tail_digest(target, length) if csv_tail else ""
    return Mark(snap.gen, snap.edits, snap.seq, length, st.st_size, st.st_ino, shape, tail,
                **extra)  # fmt: skip


def append_csv(target: Path, length: int, columns: list[str], rows: Iterable[ResultRow]) -> int:
    """Cut ``target`` back to ``length`` bytes, append ``rows`` and fsync; returns the new length.

    Opened without following a symlink (a link planted at the path is never written through).
    """
    try:
        fd = os.open(target, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise output_error(target, exc) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise output_error(target, OSError(0, "not a regular file"))
        os.ftruncate(fd, length)
        os.lseek(fd, length, os.SEEK_SET)
        buf = io.StringIO()
        writer = csv.writer(buf)
        pending = 0
        for row in rows:
            writer.writerow(row.csv_cells(columns))
            pending += 1
            if pending >= _CSV_CHUNK:
                length += _write_all(fd, buf)
                pending = 0
        length += _write_all(fd, buf)
        os.fsync(fd)
    except OSError as exc:
        raise output_error(target, exc) from exc
    finally:
        os.close(fd)
    return length


def fsync_file(target: Path) -> None:
    """Flush a file appended in place (the HDF5) to disk."""
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buf: io.StringIO) -> int:
    data = buf.getvalue().encode("utf-8")
    buf.seek(0)
    buf.truncate()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _stat_id(target: Path) -> tuple[int, int] | None:
    """(inode, size) of a regular file at ``target`` (a symlink there counts as no file)."""
    try:
        st = os.lstat(target)
    except OSError:
        return None
    return (st.st_ino, st.st_size) if stat.S_ISREG(st.st_mode) else None


def _tail_digest(target: Path, length: int) -> str:
    start = max(0, length - TAIL_BYTES)
    try:
        with open(target, "rb") as f:
            f.seek(start)
            data = f.read(length - start)
    except OSError:
        return ""
    if len(data) != length - start:
        return ""
    return hashlib.sha256(data).hexdigest()
