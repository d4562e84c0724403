"""Per-file guards: time, memory, size and crashing readers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from osteoscan.frames import ImageFrame, ReadLimits
from osteoscan.guards import (
    FileTimeout,
    GuardLimits,
    Watchdog,
    guarded_read,
    orphaned_inflight,
    time_limit,
)


def _file(tmp_path: Path, size: int = 100) -> Path:
    p = tmp_path / "f.dcm"
    p.write_bytes(b"\0" * size)
    return p


def test_time_limit_interrupts_python_code_and_restores_state() -> None:
    t0 = time.monotonic()
    with pytest.raises(FileTimeout), time_limit(0.2):
        while True:
            pass
    assert time.monotonic() - t0 < 1.0
    with time_limit(0.3):  # finishes in time: nothing raised, timer disarmed afterwards
        time.sleep(0.01)
    time.sleep(0.4)


def test_guarded_read_turns_hangs_memory_and_exceptions_into_error_rows(tmp_path: Path) -> None:
    path = _file(tmp_path)

    def slow(*a: object, **k: object) -> list[ImageFrame]:
        time.sleep(5)
        return []

    def hungry(*a: object, **k: object) -> list[ImageFrame]:
        raise MemoryError

    def broken(*a: object, **k: object) -> list[ImageFrame]:
        raise ValueError("boom")

    lim = GuardLimits(seconds=0.3)
    t0 = time.monotonic()
    (fr,) = guarded_read(path, "dicom", lim, reader=slow)
    assert time.monotonic() - t0 < 2 and fr.status == "error" and "time limit" in fr.reason
    (fr,) = guarded_read(path, "dicom", lim, reader=hungry)
    assert fr.status == "error" and "memory" in fr.reason
    (fr,) = guarded_read(path, "dicom", lim, reader=broken)
    assert fr.status == "error" and "boom" in fr.reason and fr.image is None


def test_guarded_read_checks_file_size_before_reading(tmp_path: Path) -> None:
    path = _file(tmp_path, 5000)
    called = []
    lim = GuardLimits(read=ReadLimits(max_file_bytes=1000))
    (fr,) = guarded_read(path, None, lim, reader=lambda *a, **k: called.append(1) or [])
    assert fr.status == "error" and "per-file limit" in fr.reason and not called
    (fr,) = guarded_read(tmp_path / "gone.dcm", None, lim, reader=lambda *a, **k: [])
    assert fr.status == "error" and "cannot read" in fr.reason


def test_guarded_read_rechecks_decoded_pixels(tmp_path: Path) -> None:
    import numpy as np

    path = _file(tmp_path)
    big = ImageFrame(path=str(path), image=np.zeros((100, 100), np.float32))
    lim = GuardLimits(read=ReadLimits(max_pixels=5000))
    (fr,) = guarded_read(path, None, lim, reader=lambda *a, **k: [big])
    assert fr.status == "error" and fr.image is None and "pixels" in fr.reason


_MEMORY_CHILD = textwrap.dedent(
    """
    import numpy as np
    from osteoscan.guards import limit_memory
    assert limit_memory(256 * 1024**2)
    small = np.ones(10 * 1024**2, np.uint8)  # fine
    try:
        np.ones(2 * 1024**3, np.uint8)
    except MemoryError:
        print("memoryerror")
    """
)


def test_limit_memory_makes_a_huge_allocation_a_memoryerror() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "memoryerror", out.stderr


_HANG_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from osteoscan.guards import Watchdog
    dog = Watchdog(sys.argv[1], hard_seconds=0.5)
    # a decoder stuck in C: signals cannot interrupt it (simulated by blocking SIGALRM)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    with dog.reading("/archive/evil.dcm"):
        time.sleep(30)
    """
)


def test_watchdog_ends_a_hung_worker_and_names_the_file(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _HANG_CHILD, str(tmp_path)], capture_output=True, timeout=60
    )
    assert proc.returncode == Watchdog.EXIT_CODE
    assert time.monotonic() - t0 < 20
    (orphan,) = orphaned_inflight(tmp_path)
    assert orphan[0] == "/archive/evil.dcm" and "time limit" in orphan[1] and orphan[2]
    assert orphaned_inflight(tmp_path) == []  # consumed


def test_crashed_worker_is_reported_and_live_or_idle_workers_are_not(tmp_path: Path) -> None:
    crash = "import os, sys\nfrom osteoscan.guards import Watchdog\n"
    crash += (
        "d = Watchdog(sys.argv[1], None)\nwith d.reading('/a/segv.dcm'):\n    os._exit(-11 & 255)"
    )
    subprocess.run([sys.executable, "-c", crash, str(tmp_path)], timeout=60)
    idle = "import sys\nfrom osteoscan.guards import Watchdog\nd = Watchdog(sys.argv[1], None)\n"
    idle += "with d.reading('/a/fine.dcm'):\n    pass"
    subprocess.run([sys.executable, "-c", idle, str(tmp_path)], timeout=60)
    dog = Watchdog(tmp_path, None)  # this (alive) process is reading something
    with dog.reading("/a/current.dcm"):
        orphans = orphaned_inflight(tmp_path)
    assert orphans == [
        ("/a/segv.dcm", "the reader process crashed on this file (decoder fault)", False)
    ]
