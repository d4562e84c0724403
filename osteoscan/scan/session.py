"""One scan's hold on its outputs: locks, the state database, stop signals, leftover temp files.

:class:`ScanSession` is entered first and left last by :func:`osteoscan.scan.pipeline.run_scan`:

- it takes the locks on the state and on ``--out`` (a concurrent scan is refused at once with
  :class:`~osteoscan.errors.LockHeldError` naming the holder, before any model is loaded);
- it opens the state (:class:`~osteoscan.scan.state.ScanState`), refusing a state file (or its
  ``-wal``/``-shm``/``-journal`` companions, or the in-flight folder) that is a symbolic link:
  SQLite would write wherever a link planted there points;
- it removes temporary output files a killed run left (safe: we hold the lock), and checks that
  every output folder is writable before the first image is read;
- SIGINT/SIGTERM set :attr:`stop_signal`; the orchestrator stops after the current batch, exports
  what is committed and raises :meth:`raise_if_stopped` (exit 1: run again to finish). A second
  Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from osteoscan.atomic import TEMP_NAME, output_error, refuse_symlink
from osteoscan.errors import OsteoscanError
from osteoscan.guards import tidy_inflight
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.lock import LockSet, lock_path_for
from osteoscan.scan.state import ScanState, default_state_path


class ScanSession:
    """Locks + state + signal handlers of one run (a context manager)."""

    def __init__(self, cfg: ScanConfig) -> None:
        self.cfg = cfg
        self.state_path = Path(cfg.state or default_state_path(cfg.out))
        self.inflight_dir = Path(str(self.state_path) + ".inflight")
        self.stop_signal: str | None = None
        self._locks = LockSet([lock_path_for(self.state_path), lock_path_for(cfg.out)])
        self._old_handlers: dict[int, Any] = {}
        self._state: ScanState | None = None

    @property
    def state(self) -> ScanState:
        """The open state database (only inside the ``with`` block)."""
        if self._state is None:
            raise RuntimeError("the scan session is not open")
        return self._state

    def __enter__(self) -> ScanSession:
        self._locks.acquire()
        try:
            refuse_state_links(self.state_path)
            refuse_symlink(self.inflight_dir, "in-flight folder")
            self._state = ScanState.open(self.state_path)
        except BaseException:
            self._locks.release()
            raise
        try:
            for folder in self._output_folders():
                sweep_temp_files(folder)
                check_writable(folder)  # fail now, not after a night of scoring
        except BaseException:
            self.__exit__()
            raise
        self._install_signals()
        return self

    def _output_folders(self) -> set[Path]:
        cfg = self.cfg
        folders = {Path(cfg.out).parent, Path(cfg.hdf5 or cfg.out).parent}
        return folders | ({Path(cfg.heatmaps_dir)} if cfg.heatmaps_dir else set())

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        try:
            if self._state is not None:
                self._state.close()
            tidy_inflight(self.inflight_dir)
        finally:
            self._locks.release()

    def raise_if_stopped(self) -> None:
        """After a stop signal: exit 1 with a message saying the results so far are saved."""
        if self.stop_signal is not None:
            raise OsteoscanError(
                f"stopped by {self.stop_signal} after the current batch; results so far are "
                "saved - run the same command again to finish the remaining files"
            )

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _stop(signum: int, frame: FrameType | None) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, _stop)


STATE_COMPANIONS = ("", "-wal", "-shm", "-journal")  # SQLite's files for one database


def refuse_state_links(state_path: str | Path) -> None:
    """Raise :class:`~osteoscan.errors.OutputError` when the state file or one of SQLite's
    companion files is a symbolic link (SQLite opens them in place, following links)."""
    for suffix in STATE_COMPANIONS:
        refuse_symlink(f"{state_path}{suffix}", "scan state file")


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it, or raise OutputError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".osteoscan-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise output_error(folder, exc) from exc


def sweep_temp_files(folder: str | Path | None) -> int:
    """Remove temporary output files a killed run left in ``folder`` (we hold the lock)."""
    if folder is None or not Path(folder).is_dir():
        return 0
    n = 0
    for p in Path(folder).iterdir():
        if TEMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
