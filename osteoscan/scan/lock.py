"""One scan at a time per state / outputs: an OS lock on a small file, with holder details inside.

Why ``fcntl.lockf`` (POSIX record lock) and not ``flock``: both are released by the kernel the
instant the holding process dies (SIGKILL, OOM, power loss - there is nothing to clean up, so a
*stale* lock cannot exist: a lock file left behind by a dead process is simply taken over, and
we say so). But an ``flock`` belongs to the open file description, which forked children inherit:
DataLoader workers of a killed scan keep an ``flock`` for the seconds they take to notice their
parent died, and the next run would be refused. POSIX locks belong to the *process*, are not
inherited across ``fork``, and also work over NFS (through the lock manager). Their one pitfall -
closing *any* descriptor of the file in the holding process drops the lock - is avoided by only
ever touching the file through the one descriptor kept open here. POSIX locks do not exclude
threads of the same process, so an in-process registry refuses a second lock on the same file.

The file holds one JSON line ``{"pid", "host", "started_at", "argv"}`` so a refused run can name
the running process. It is never deleted (unlinking a lock file races with a process that opened
it just before); it is emptied on release. It is opened with ``O_NOFOLLOW``: a symbolic link
planted at its path is refused (it would have us truncate and write the file it points to), and
what a lock file says about its holder is shown as inert text.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from osteoscan.errors import LockHeldError, OutputError
from osteoscan.inert import cap, log_safe
from osteoscan.rows import utc_now

_held: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of lock files held here → their fd
_held_guard = threading.Lock()


def lock_path_for(path: str | Path) -> Path:
    """The lock file guarding ``path`` (a state database or an output): ``<path>.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class ScanLock:
    """Exclusive, non-blocking lock: ``with ScanLock(path): ...`` or ``acquire()``/``release()``.

    ``acquire`` raises :class:`~osteoscan.errors.LockHeldError` at once when another process (or
    another ScanLock in this process) holds it, naming the holder's PID, host and start time.
    ``previous`` is set to the holder details found in a lock file left by a dead run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self.previous: dict[str, Any] | None = None

    def _read_info(self, fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, 4096, 0)
            info = json.loads(data.decode("utf-8", "replace") or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> ScanLock:
        """Take the lock or raise LockHeldError; returns self."""
        with _held_guard:
            # Closing *any* descriptor of a file drops this process's POSIX lock on it, so a
            # file already locked here must be recognised without opening it again.
            try:
                st = os.stat(self.path)
                holder = _held.get((st.st_dev, st.st_ino))
            except OSError:
                holder = None
            if holder is not None:
                raise LockHeldError(_held_message(self.path, self._read_info(holder)))
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                if os.path.islink(self.path):  # ELOOP from O_NOFOLLOW
                    raise OutputError(
                        f"refusing to open the lock file {self.path}: it is a symbolic link, "
                        "which osteoscan never writes through; remove the link"
                    ) from exc
                raise OutputError(
                    f"cannot create the lock file {self.path}: {exc.strerror}"
                ) from exc
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                info = self._read_info(fd)
                os.close(fd)  # we hold no lock on it, closing is harmless
                raise LockHeldError(_held_message(self.path, info)) from None
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            _held[key] = fd
        info = self._read_info(fd)
        if info.get("pid"):
            # Lock acquired although the file names a holder: that run died without releasing
            # (the kernel dropped its lock). Take it over, and let the caller log it.
            self.previous = info
        payload = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": utc_now(),
            "argv": [os.path.basename(sys.argv[0])] + sys.argv[1:2],
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(payload) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError:
            pass  # the lock itself is held; the details are a courtesy
        self._fd, self._key = fd, key
        return self

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the POSIX lock
        with _held_guard:
            _held.pop(self._key, None)  # type: ignore[arg-type]
        self._fd = self._key = None

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def __enter__(self) -> ScanLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_message(path: Path, info: dict[str, Any]) -> str:
    # The details come from a file anyone who can write the folder can write: inert text only.
    info = {k: cap(log_safe(v), 200) for k, v in info.items() if k in ("pid", "host", "started_at")}
    pid = info.get("pid") if str(info.get("pid", "")).isdigit() else None
    who = f"PID {pid}" if pid else "another process"
    if info.get("host") and info.get("host") != socket.gethostname():
        who += f" on host {info['host']}"
    elif pid and not _pid_alive(int(pid)):
        # Holder recorded in the file is gone but the lock is still held: its forked children
        # (or a process on another host sharing the file) still hold it.
        who += " (exited; a child process of it still holds the lock)"
    since = f", running since {info['started_at']}" if info.get("started_at") else ""
    return (
        f"another osteoscan scan ({who}{since}) is using the same state/outputs "
        f"(lock {path}); wait for it to finish or point --out/--state elsewhere"
    )


class LockSet:
    """Several locks taken together (state and each output), all-or-nothing, in sorted order."""

    def __init__(self, paths: list[str | Path]) -> None:
        # Only the folder is resolved: resolving the lock file itself would follow a symlink
        # planted there and lock (and write) the file it points to.
        uniq = sorted({str(Path(p).parent.resolve() / Path(p).name) for p in paths})
        self.locks = [ScanLock(p) for p in uniq]

    def acquire(self) -> LockSet:
        """Take every lock, or none (raising LockHeldError)."""
        taken: list[ScanLock] = []
        try:
            for lock in self.locks:
                taken.append(lock.acquire())
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return self

    def release(self) -> None:
        """Release every lock taken."""
        for lock in reversed(self.locks):
            lock.release()

    @property
    def previous(self) -> list[dict[str, Any]]:
        """Details of dead runs whose lock files were taken over."""
        return [lk.previous for lk in self.locks if lk.previous]

    def __enter__(self) -> LockSet:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
