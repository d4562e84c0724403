"""Scan lock: a second holder is refused at once and named; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from osteoscan.errors import LockHeldError, OutputError
from osteoscan.scan.lock import LockSet, ScanLock, lock_path_for

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from osteoscan.scan.lock import ScanLock
    lock = ScanLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _spawn_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_path_for() -> None:
    assert lock_path_for("/a/results.state.sqlite") == Path("/a/results.state.sqlite.lock")


def test_second_lock_in_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with ScanLock(path) as first:
        assert first.held
        with pytest.raises(LockHeldError, match=f"PID {os.getpid()}"):
            ScanLock(path).acquire()
        assert first.held  # the refused attempt must not drop the holder's POSIX lock
    assert path.read_text() == ""  # emptied on release
    with ScanLock(path):  # free again
        pass


def test_other_process_holding_is_named_and_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = _spawn_holder(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeldError) as err:
            ScanLock(path).acquire()
        assert time.monotonic() - t0 < 1.0
        assert f"PID {proc.pid}" in str(err.value) and "running since" in str(err.value)
    finally:
        proc.kill()
        proc.wait()
    # the holder died by SIGKILL: the kernel released its lock; we take over and know from whom
    lock = ScanLock(path).acquire()
    try:
        assert lock.previous is not None and lock.previous["pid"] == proc.pid
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_lock_file_left_with_dead_pid_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    path.write_text(json.dumps({"pid": int(dead), "host": "h", "started_at": "then"}))
    with ScanLock(path) as lock:
        assert lock.previous["pid"] == int(dead)


_FORKING_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from osteoscan.scan.lock import ScanLock
    lock = ScanLock(sys.argv[1]).acquire()
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
    """
)


def test_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path: Path) -> None:
    """DataLoader workers are forked and outlive a SIGKILLed scan for a few seconds."""
    path = tmp_path / "x.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _FORKING_HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the child is still alive...
        with ScanLock(path) as lock:  # ...and yet the lock is free at once
            assert lock.previous["pid"] == proc.pid
    finally:
        os.kill(child, 9)


def test_lockset_is_all_or_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.lock", tmp_path / "b.lock"
    with ScanLock(b), pytest.raises(LockHeldError):
        LockSet([a, b]).acquire()
    with ScanLock(a):  # a was released after the failed LockSet
        pass
    with LockSet([a, b, a]) as ls:
        assert len(ls.locks) == 2


def test_a_symlink_at_the_lock_path_is_refused_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    lock = tmp_path / "out" / "results.csv.lock"
    lock.parent.mkdir()
    lock.symlink_to(outside)
    with pytest.raises(OutputError, match="symbolic link"):
        ScanLock(lock).acquire()
    # a LockSet resolves only the folder: it must not lock (and fill in) the link's target
    with pytest.raises(OutputError, match="symbolic link"):
        LockSet([lock]).acquire()
    assert outside.read_text() == "precious\n"
    dangling = tmp_path / "out" / "state.lock"
    dangling.symlink_to(tmp_path / "elsewhere.lock")
    with pytest.raises(OutputError, match="symbolic link"):
        ScanLock(dangling).acquire()
    assert not (tmp_path / "elsewhere.lock").exists()


def test_holder_details_from_the_lock_file_are_shown_as_inert_text(tmp_path: Path) -> None:
    from osteoscan.scan.lock import _held_message

    text = _held_message(
        tmp_path / "x.lock",
        {"pid": "1; rm -rf", "host": "\x1b[2Jevil\nhost", "started_at": "\x9b31m" + "t" * 999},
    )
    assert "\x1b" not in text and "\n" not in text and "\x9b" not in text
    assert "\\x1b[2Jevil" in text and "PID" not in text and len(text) < 600
