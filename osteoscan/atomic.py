"""Atomic file writes, and the one mapping of output ``OSError`` to :class:`OutputError`.

Every file osteoscan publishes (results CSVs, HDF5, heatmap PNGs, model packages, evaluation
reports, exported model inputs, training cache entries) goes through :class:`AtomicFile`: the data
is written to a temporary file *in the target's folder* (so the rename never crosses a file
system), fsynced, renamed over the target with ``os.replace`` and the folder fsynced. A kill at any
instant leaves either the previous file or the complete new one, never a partial file under the
target name; a failed or aborted write removes its temporary file.

Temporary names are ``.<target name>.<8 random characters>.tmp``: hidden, and matched by
:data:`TEMP_NAME`, which the scan uses to sweep temporary files left by killed runs.

Symbolic links planted by someone else are never written through. A temporary file is created
exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``: a name that exists, a symlink included, is never
opened; another random name is tried) and reopened only with ``O_NOFOLLOW``; its permissions are
``0666`` less the user's umask, never wider. ``os.replace`` (``rename(2)``) replaces a symlink at
the target path itself and never follows it. Files that are opened in place (the scan state, the
lock files) are checked with :func:`refuse_symlink`.

``OSError`` while writing becomes :class:`OutputError` naming the file and the cause in words
(:func:`output_error`): the CLI ends with exit 1 and earlier outputs stay intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from osteoscan.errors import OutputError
from osteoscan.inert import log_safe

# errno → words for the causes a person can fix; anything else keeps the system's own text.
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EIO: "an I/O error occurred",
}
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # the names AtomicFile's temporaries get
# Outputs and packages are shared, readable files, as far as the user's umask allows (never wider).
FILE_MODE = 0o666
_RANDOM = string.ascii_letters + string.digits
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NAME_MAX = 255


def output_error(target: str | Path, exc: OSError) -> OutputError:
    """An :class:`OutputError` naming the file and the cause, saying earlier files are intact."""
    why = _OUTPUT_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    name = errno.errorcode.get(exc.errno or 0, "")
    return OutputError(
        f"cannot write {log_safe(target)}: {why}{f' ({name})' if name else ''}. "
        "Earlier results are intact; fix the cause and re-run."
    )


@contextlib.contextmanager
def output_errors(target: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :func:`output_error` for ``target``."""
    try:
        yield
    except OSError as exc:
        raise output_error(target, exc) from exc


def refuse_symlink(path: str | Path, what: str = "file") -> None:
    """Raise :class:`OutputError` when ``path`` is a symbolic link (dangling or not).

    For files osteoscan opens in place rather than replacing (the scan state and its ``-wal``,
    ``-shm`` and ``-journal`` companions, lock files): writing through a link planted by someone
    else would write wherever it points.
    """
    if os.path.islink(path):
        raise OutputError(
            f"refusing to open the {what} {log_safe(path)}: it is a symbolic link (to "
            f"{log_safe(os.readlink(path))}), which osteoscan never writes through; remove the "
            "link or choose another path"
        )


def create_exclusive(folder: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new file ``<folder>/<prefix><8 random characters><suffix>`` that did not exist
    (never following a symlink), mode ``0666`` less the umask; returns (fd, path)."""
    keep = _NAME_MAX - 8 - len(suffix)
    if len(os.fsencode(prefix)) > keep:  # a very long target name: keep the temporary legal
        prefix = os.fsdecode(os.fsencode(prefix)[:keep]) if keep > 0 else "."
    for _ in range(100):
        name = prefix + "".join(secrets.choice(_RANDOM) for _ in range(8)) + suffix
        path = Path(folder) / name
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
            return os.open(path, flags, FILE_MODE), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def _open_flags(mode: str) -> int:
    if "+" in mode:
        flags = os.O_RDWR
    elif "r" in mode:
        flags = os.O_RDONLY
    else:
        flags = os.O_WRONLY
    if "w" in mode:
        flags |= os.O_TRUNC
    if "a" in mode:
        flags |= os.O_APPEND
    return flags | _NOFOLLOW | _CLOEXEC


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file next to ``target`` that replaces it on :meth:`commit`.

    Write to :attr:`tmp` (a path, for libraries that open files themselves) or through
    :meth:`open`. Used as a context manager, it commits when the block ends normally and aborts
    when it raises; an ``OSError`` from the block becomes an :class:`OutputError`. Creating the
    object makes the target's folder if needed.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        with output_errors(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = create_exclusive(self.target.parent, f".{self.target.name}.")
        os.close(fd)
        self.done = False
        self._handles: list[IO[Any]] = []

    def open(self, mode: str = "wb", **kwargs: Any) -> IO[Any]:
        """Open the temporary file (closed here at the latest on commit or abort)."""
        with output_errors(self.target):
            fd = os.open(self.tmp, _open_flags(mode))  # never through a link put in its place
            try:
                fh = os.fdopen(fd, mode, **kwargs)
            except BaseException:
                os.close(fd)
                raise
        self._handles.append(fh)
        return fh

    def commit(self, target: str | Path | None = None) -> Path:
        """Publish the temporary file as the target (or as ``target``, a name in the same folder
        chosen after writing, e.g. from the content's hash); returns the published path."""
        final = self.target if target is None else self.target.parent / Path(target).name
        try:
            for fh in self._handles:
                fh.close()
            fd = os.open(self.tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # rename(2) replaces whatever is at ``final`` (a planted symlink included) without
            # following it: the data never lands outside the output folder.
            os.replace(self.tmp, final)
        except OSError as exc:
            self.abort()
            raise output_error(final, exc) from exc
        self.done = True
        fsync_dir(final.parent)
        return final

    def abort(self) -> None:
        """Drop the temporary file; the target stays as it was. Safe to call more than once."""
        if self.done:
            return
        self.done = True
        for fh in self._handles:
            # Closing a broken file must not mask the error that made us abort.
            with contextlib.suppress(Exception):
                fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError):
            raise output_error(self.target, exc) from exc


def atomic_write(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``target`` through ``write(tmp_path)``, then publish it atomically; return it."""
    with AtomicFile(target) as f:
        write(f.tmp)
    return f.target


def write_bytes(target: str | Path, data: bytes) -> Path:
    """Atomically replace ``target`` with ``data``."""
    return atomic_write(target, lambda tmp: _write_nofollow(tmp, data))


def write_text(target: str | Path, text: str) -> Path:
    """Atomically replace ``target`` with UTF-8 ``text``."""
    return atomic_write(target, lambda tmp: _write_nofollow(tmp, text.encode("utf-8")))


def _write_nofollow(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
