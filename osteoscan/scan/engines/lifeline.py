"""Nothing outlives the scan that started it: helper processes die with their parent.

A scan killed with SIGKILL (the OOM killer, a cron timeout) cannot clean up. Its forkserver and
DataLoader workers would then live on, orphaned, holding memory night after night. On Linux the
kernel can send a signal to a process when its parent dies (``PR_SET_PDEATHSIG``): the
forkserver asks for it when it starts (:mod:`._forkserver` is imported there, and only there) and
each reader worker in its ``worker_init_fn``, so the chain scan → forkserver → workers ends
within moments of the scan, however it ends. Elsewhere this is a no-op; DataLoader workers still
notice a dead parent on their own, only later.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


SCAN_PID_ENV = "OSTEOSCAN_SCAN_PID"  # the scan's pid, set for the forkserver it starts


def die_with_parent(
    sig: int = signal.SIGKILL, parent: int | None = None, scan: int | None = None
) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; True when armed.

    ``parent`` is the pid the parent must have (default: the current one); if the parent is
    already gone (it died before the request took effect), exit at once, and likewise when the
    ``scan`` process (for a reader worker: the grandparent) is gone.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.restype = ctypes.c_int
        # prctl is variadic and reads unsigned longs: pass them as such, not as C ints
        args = (ctypes.c_ulong(int(sig)), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        armed = libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), *args) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent or (scan is not None and not _alive(scan)):
        os._exit(1)  # orphaned before the request took effect: nobody will read our results
    return armed


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def watch_scan(scan: int, interval: float = 1.0) -> threading.Thread:
    """A daemon thread that ends this process once the ``scan`` process is gone.

    Covers what a parent-death signal cannot: a worker forked while its forkserver was being
    killed is adopted by init before it can ask for the signal.
    """

    def _watch() -> None:
        while _alive(scan):
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=_watch, name="osteoscan-lifeline", daemon=True)
    thread.start()
    return thread


def scan_pid() -> int | None:
    """The pid of the scan that started this process's forkserver (None outside a scan)."""
    value = os.environ.get(SCAN_PID_ENV, "")
    return int(value) if value.isdigit() else None
