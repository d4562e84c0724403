"""Per-file guards: no single file may stall or exhaust an unattended scan.

Three limits turn a hostile or broken file into an ``error`` row instead of a dead night:

* **pixels** - :class:`~osteoscan.frames.ReadLimits` ``max_pixels`` (rows x columns x frames x
  samples) and ``max_file_bytes`` are checked from the header *before* any decoding, by the
  readers; :func:`guarded_read` checks the file size first and the decoded result again, so a
  60000 x 60000 header or a decompression bomb never allocates its claimed size.
* **time** - the DataLoader's own ``timeout`` would kill the whole loader, so the limit is taken
  per file inside the worker: :func:`time_limit` arms ``setitimer(ITIMER_REAL)``; its SIGALRM
  handler raises :class:`FileTimeout` in the reading (main) thread of the worker process. Python
  code (pydicom parsing, our pixel maths) is interrupted at once; a C decoder is interrupted when
  it returns to Python. A decoder stuck *inside* C forever is the one case a signal cannot end:
  :class:`Watchdog` (hard limit, a thread) then records the file in an in-flight log and ends the
  worker with ``os._exit``; the pipeline sees the worker die, turns the file named in its
  in-flight log into an error row (:func:`orphaned_inflight`) and carries on. The same log
  catches decoders that crash the process (SIGSEGV on a fuzzed file).
* **memory** - :func:`limit_memory` sets ``RLIMIT_AS`` in *reader worker processes only*: the
  current address-space size plus a budget, so allocations beyond it raise ``MemoryError`` (an
  error row) instead of waking the OOM killer. Never in the main process: CUDA and torch reserve
  large virtual ranges there (the CUDA driver maps tens of GiB of address space), which
  ``RLIMIT_AS`` counts. Workers never touch CUDA, so their address space is the torch import
  plus the image being read.

Output errors (disk full, permission denied) are not a per-file matter: :mod:`osteoscan.atomic`
turns them into :class:`~osteoscan.errors.OutputError`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.frames import ImageFrame, ReadLimits
from osteoscan.inert import cap, log_safe, unquote


class FileTimeout(Exception):
    """Reading one file took longer than its time limit."""


@dataclass(frozen=True)
class GuardLimits:
    """All per-file limits. ``None`` disables a limit."""

    read: ReadLimits = field(default_factory=ReadLimits)
    seconds: float | None = 60.0  # soft limit: SIGALRM in the reading thread
    hard_seconds: float | None = 180.0  # hard limit: the worker process ends (C-level hang)
    memory_bytes: int | None = 6 * 1024**3  # address space a worker may add on top of its start


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`FileTimeout` in this thread when the block runs longer than ``seconds``.

    Works in the main thread of a process on Unix (DataLoader workers run ``__getitem__`` there);
    elsewhere (other threads, Windows) it is a no-op and only the hard :class:`Watchdog` applies.
    Restores any timer and handler that were armed before.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable or seconds is None:
        yield
        return

    def _on_alarm(signum: int, frame: Any) -> None:
        raise FileTimeout(f"reading took longer than {seconds:g} s")

    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_timer = signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


def _address_space_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def limit_memory(budget_bytes: int | None) -> int | None:
    """Cap this process's address space at its current size + ``budget_bytes`` (workers only).

    Returns the limit set, or ``None`` when not set (no budget, unknown size, or a lower limit is
    already in force). Never call it in a process that uses CUDA (see the module docstring).
    """
    if not budget_bytes or not hasattr(resource, "RLIMIT_AS"):
        return None
    current = _address_space_bytes()
    if current is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + int(budget_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        return None
    return limit


class Watchdog:
    """Hard per-file time limit for a worker process, plus an in-flight log for crash triage.

    ``with watchdog.reading(path): ...`` writes ``path`` to ``<dir>/<pid>.inflight`` (one small
    ``pwrite``; no fsync needed since only the process's own death must be survived) and arms a
    deadline. A daemon thread checks it; past ``hard_seconds`` it appends ``hard-timeout`` to the
    log and calls ``os._exit(70)`` - the one way to stop a decoder looping in C.
    """

    EXIT_CODE = 70

    def __init__(self, inflight_dir: str | Path | None, hard_seconds: float | None) -> None:
        self.dir = Path(inflight_dir) if inflight_dir else None
        self.hard_seconds = hard_seconds
        self._deadline: float | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: never write through a symlink planted at the log's path
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            self._fd = os.open(self.dir / f"{os.getpid()}.inflight", flags, 0o644)
        if hard_seconds:
            threading.Thread(target=self._watch, name="osteoscan-watchdog", daemon=True).start()

    def _watch(self) -> None:
        step = min(1.0, max(0.05, (self.hard_seconds or 1) / 20))
        while True:
            time.sleep(step)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
            if late:
                if self._fd is not None:
                    os.pwrite(self._fd, b"\nhard-timeout", os.fstat(self._fd).st_size)
                os._exit(self.EXIT_CODE)

    @contextmanager
    def reading(self, path: str | Path) -> Iterator[None]:
        """Mark ``path`` in flight (and under the hard deadline) for the duration of the block."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, os.fsencode(str(path)), 0)
        with self._lock:
            self._deadline = time.monotonic() + self.hard_seconds if self.hard_seconds else None
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None
            if self._fd is not None:
                os.ftruncate(self._fd, 0)


def orphaned_inflight(inflight_dir: str | Path) -> list[tuple[str, str, bool]]:
    """Files that were being read by processes that have since died.

    Returns ``(path, reason, certain)`` triples and removes the logs of dead processes.
    ``certain`` is True when the watchdog itself ended the process (hard time limit). An
    untagged log only says the process died while reading: a decoder crash if the caller saw a
    reader process die during its run, but possibly an outside kill of the whole scan when found
    at the start of a run (callers count repeats before blaming the file).
    """
    out: list[tuple[str, str, bool]] = []
    d = Path(inflight_dir)
    if not d.is_dir():
        return out
    for log in sorted(d.glob("*.inflight")):
        try:
            pid = int(log.stem)
            os.kill(pid, 0)
            continue  # alive
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        text = log.read_bytes().decode("utf-8", "surrogateescape")
        log.unlink(missing_ok=True)
        if not text.strip():
            continue
        path, _, tag = text.partition("\n")
        if tag.strip() == "hard-timeout":
            reason = "the decoder did not finish within the hard time limit; reading stopped"
            out.append((path, reason, True))
        else:
            out.append((path, "the reader process crashed on this file (decoder fault)", False))
    return out


def error_frame(path: str | Path, reason: str, kind: str = "") -> ImageFrame:
    """An ``error`` row for a file that could not be read safely (no image, no identifiers)."""
    return ImageFrame(path=str(path), frame=0, status="error", reason=reason, kind=kind)


def guarded_read(
    path: str | Path,
    kind: str | None = None,
    limits: GuardLimits | None = None,
    *,
    decode: bool = True,
    reader: Callable[..., list[ImageFrame]] | None = None,
) -> list[ImageFrame]:
    """``osteoscan.readers.read_frames`` under the per-file limits; never raises.

    File size is checked before opening, pixels by the reader from the header before decoding
    (and again on the result), time by :func:`time_limit`; ``MemoryError`` (the worker's
    ``RLIMIT_AS``) becomes an error row too.
    """
    lim = limits or GuardLimits()
    if reader is None:
        from osteoscan.readers import read_frames

        reader = read_frames
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return [error_frame(path, f"cannot read the file: {exc.strerror}", kind or "")]
    if lim.read.max_file_bytes and size > lim.read.max_file_bytes:
        return [
            error_frame(
                path,
                f"file is {size / 1024**2:.0f} MiB, above the per-file limit of "
                f"{lim.read.max_file_bytes / 1024**2:.0f} MiB",
                kind or "",
            )
        ]
    try:
        with time_limit(lim.seconds):
            frames = reader(path, kind, limits=lim.read, decode=decode)
    except FileTimeout as exc:
        return [error_frame(path, f"{exc} (per-file time limit); file skipped", kind or "")]
    except MemoryError:
        return [
            error_frame(path, "decoding needed more memory than the per-file limit", kind or "")
        ]
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - Rust decoders' PanicException is a BaseException
        # A reader must not raise, but one bad file never stops the run. The message may quote
        # the file's bytes: quoted values left out, inert and short.
        why = cap(log_safe(f"unreadable: {type(exc).__name__}: {unquote(str(exc))}"), 300)
        return [error_frame(path, why, kind or "")]
    for fr in frames:
        img = fr.image
        if img is None:
            continue
        if lim.read.max_pixels and img.size > lim.read.max_pixels:
            fr.image, fr.status = None, "error"
            fr.reason = f"image has {img.size} pixels, above the limit of {lim.read.max_pixels}"
        elif not np.isfinite(img).all():  # e.g. a NaN/inf window in the header: never score it
            fr.image, fr.status = None, "error"
            fr.reason = "decoded pixels are not finite numbers (corrupt rescale/window values)"
    return frames


def tidy_inflight(inflight_dir: str | Path | None) -> None:
    """Remove the empty in-flight logs of finished readers (and the folder when it empties).

    Only empty logs go: a non-empty one is evidence of a reader that died mid-file, which the
    next run's :func:`orphaned_inflight` turns into an error row.
    """
    if inflight_dir is None or not Path(inflight_dir).is_dir():
        return
    d = Path(inflight_dir)
    for log in d.glob("*.inflight"):
        with contextlib.suppress(OSError):
            if log.stat().st_size == 0:
                log.unlink()
    with contextlib.suppress(OSError):
        d.rmdir()  # fails, harmlessly, while anything is left in it
