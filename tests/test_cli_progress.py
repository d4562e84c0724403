"""Progress rendering: Rich on a terminal, timestamped log lines for --quiet / cron."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from osteoscan.cli.progress import LogReporter, RichReporter, make_reporter
from osteoscan.scan.pipeline import ScanEvent, ScanSummary

COUNTS = {"ok": 5, "skipped": 1, "error": 2, "flagged": 3}


def event(kind: str, done: int) -> ScanEvent:
    return ScanEvent(kind, done, 10, dict(COUNTS), done, 2.0, 4.0, 3.0, "10 files to scan")


def summary() -> ScanSummary:
    totals = {"rows": 502, "ok": 500, "skipped": 1, "error": 1, "flagged": 61}
    return ScanSummary(10, 1, 8, dict(COUNTS), 2.0, 4.0, Path("r.csv"), Path("r.flagged.csv"),
                       None, None, ["m 1"], "cpu", 1, 32, [], totals)  # fmt: skip


def test_quiet_or_pipe_gives_log_lines() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False)
    rep = make_reporter(False, console)
    assert isinstance(rep, LogReporter)
    rep.log_every = 0.0
    for ev in (event("start", 0), event("batch", 5), event("done", 10)):
        rep(ev)
    rep.summary(summary())
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ osteoscan scan: ", ln) for ln in lines)
    assert "ok=5 skipped=1 error=2 flagged=3" in lines[1] and "ETA" in lines[1]
    # a rescan's summary counts what the results hold, not only this run's new rows
    assert lines[4].endswith("results hold 502 rows: ok=500 skipped=1 error=1 flagged=61")


def test_terminal_gets_rich_display_and_summary_table() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140)
    rep = make_reporter(False, console)
    assert isinstance(rep, RichReporter)
    rep(event("start", 0))
    rep(event("batch", 5))
    rep.close()
    rep.summary(summary())
    text = buf.getvalue()
    assert "flagged" in text and "img/s" in text and "r.flagged.csv" in text
    assert isinstance(make_reporter(True, console), LogReporter)
