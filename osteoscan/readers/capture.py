"""What C decoders print, attributed to the file being decoded.

libjpeg ("Premature end of JPEG file", "Corrupt JPEG data: …"), libpng and OpenJPEG report
problems by printing to the process's stderr (file descriptor 2) and may still return an image —
a nearly blank one for a truncated JPEG. Printed at C level, such a message reaches the log with
no file name, and the image is scored as if nothing happened. :func:`decoder_messages` redirects
fd 2 into a private buffer for the duration of one decode; the reader turns anything a decoder
printed into the file's ``error`` reason.

Python-level writers keep their stderr: ``sys.stderr`` is pointed at a duplicate of the original
fd 2 for the same window, so a progress display or a log handler that looks up ``sys.stderr`` is
not swallowed. What another thread prints *at C level* during the few milliseconds of a decode
would be captured too; osteoscan reads files in worker processes (or in the main thread while
nothing else runs), where no other thread prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Captured", "decoder_messages"]

_LOCK = threading.Lock()  # fd 2 is process-wide: one capture at a time
_MAX_BYTES = 4096


class Captured:
    """Holds the text a decoder printed; ``text`` is set when the ``with`` block ends."""

    def __init__(self) -> None:
        self.text = ""

    def summary(self, limit: int = 200) -> str:
        """Distinct non-empty lines, joined with '; ', at most ``limit`` characters."""
        lines: list[str] = []
        for line in self.text.splitlines():
            line = line.strip()
            if line and line not in lines:
                lines.append(line)
        out = "; ".join(lines)
        return out if len(out) <= limit else out[: limit - 1] + "…"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


def _redirect() -> tuple[int, Any, Any] | None:
    """Point fd 2 at a fresh buffer and ``sys.stderr`` at the real stderr; None if impossible."""
    try:
        saved = os.dup(2)
    except OSError:
        return None
    try:
        sink = tempfile.TemporaryFile()  # noqa: SIM115 - closed by decoder_messages
        _flush()
        replacement = io.TextIOWrapper(
            os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True, errors="replace"
        )
        os.dup2(sink.fileno(), 2)
    except OSError:
        os.close(saved)
        return None
    return saved, sink, replacement


@contextlib.contextmanager
def decoder_messages() -> Iterator[Captured]:
    """Capture what C code prints to fd 2 inside the block (see the module docstring).

    Never raises itself: when fd 2 cannot be redirected (none open, a sandbox) nothing is
    captured and the block runs as it is.
    """
    captured = Captured()
    with _LOCK:
        state = _redirect()
        if state is None:
            yield captured
            return
        saved, sink, replacement = state
        old_stderr, sys.stderr = sys.stderr, replacement
        try:
            yield captured
        finally:
            _flush()
            sys.stderr = old_stderr
            os.dup2(saved, 2)
            os.close(saved)
            with contextlib.suppress(Exception):
                replacement.close()
            sink.seek(0)
            captured.text = sink.read(_MAX_BYTES).decode("utf-8", "replace")
            sink.close()
