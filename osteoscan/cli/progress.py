"""Render scan progress events: a Rich live display on a terminal, log lines otherwise.

The core (:func:`osteoscan.scan.pipeline.run_scan`) only emits :class:`ScanEvent` objects; this
module decides how a person (or a cron log) sees them. ``--quiet`` or a non-terminal stderr give
plain, timestamped lines (start, at most one every ``log_every`` seconds, done).

Every line and every cell shown passes through :func:`osteoscan.inert.log_safe` (and Rich markup
escaping): a file name or header value with ``\x1b[2J`` or ``[bold]`` is shown as text, never
acted on by the terminal of whoever reads the log.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from osteoscan.inert import log_safe
from osteoscan.rows import utc_now
from osteoscan.scan.config import ScanEvent, ScanSummary


def _shown(text: object) -> str:
    """Inert text for the Rich display: visible escapes, and markup shown as written."""
    return escape(log_safe(text))


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return str(_dt.timedelta(seconds=int(round(seconds))))


def _counts(c: dict[str, int]) -> str:
    text = " ".join(f"{k}={c.get(k, 0)}" for k in ("ok", "skipped", "error", "flagged"))
    return text + (f" unchanged={c['unchanged']}" if "unchanged" in c else "")


def held(s: ScanSummary) -> str:
    """What the results hold after the run (all runs), e.g. ``70 rows: ok=60 ... flagged=12``."""
    gone = f" missing={s.totals['missing']}" if s.totals.get("missing") else ""
    return f"{s.totals.get('rows', 0)} rows: {_counts(s.totals)}{gone}"


class LogReporter:
    """Plain timestamped lines for cron logs and ``--quiet``."""

    def __init__(self, console: Console, log_every: float = 30.0, prefix: str = "scan") -> None:
        self.console, self.log_every, self.prefix = console, log_every, prefix
        self._last = 0.0

    def _line(self, text: str) -> None:
        self.console.print(f"{utc_now()} osteoscan {self.prefix}: {log_safe(text)}", markup=False,
                           highlight=False, soft_wrap=True)  # fmt: skip

    def __call__(self, ev: ScanEvent) -> None:
        now = time.monotonic()
        if ev.kind == "start":
            self._line(ev.message or f"{ev.files_total} files to scan")
            self._last = now
        elif ev.kind == "batch" and now - self._last >= self.log_every:
            self._last = now
            self._line(
                f"{ev.files_done}/{ev.files_total} files, {_counts(ev.counts)}, "
                f"{ev.images_per_s:.1f} images/s, ETA {_eta(ev.eta_s)}"
            )
        elif ev.kind == "done":
            self._line(
                f"done: {ev.rows} rows from {ev.files_done} files in {ev.elapsed_s:.1f} s "
                f"({ev.images_per_s:.1f} images/s), {_counts(ev.counts)}"
            )

    def close(self) -> None:
        """Nothing to tear down."""

    def summary(self, s: ScanSummary) -> None:
        """Where the outputs are."""
        outs = [str(s.out), str(s.flagged_out)]
        outs += [str(p) for p in (s.hdf5, s.heatmaps_dir) if p is not None]
        verb = "up to date" if s.written == [] else "wrote"
        self._line(f"{verb} {', '.join(outs)} (model {', '.join(s.models)}, device {s.device})")
        self._line(f"results hold {held(s)}")
        if s.dicom_results:
            self._line(f"DICOM results: {s.dicom_results}")
        if s.covariates:
            self._line(s.covariates)
        for warning in s.warnings:
            self._line(f"warning: {warning}")


class RichReporter:
    """Live progress bar with images/s, ETA and ok/skipped/error/flagged counts."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]scan[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None

    def __call__(self, ev: ScanEvent) -> None:
        c = ev.counts
        stats = (
            f"{ev.images_per_s:5.1f} img/s  [green]ok {c.get('ok', 0)}[/] "
            f"[yellow]skipped {c.get('skipped', 0)}[/] [red]error {c.get('error', 0)}[/] "
            f"[magenta]flagged {c.get('flagged', 0)}[/]"
        )
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("scan", total=max(ev.files_total, 1), stats=stats)
        self.progress.update(self.task, completed=ev.files_done, stats=stats)

    def close(self) -> None:
        """Stop the live display."""
        if self.task is not None:
            self.progress.stop()

    def summary(self, s: ScanSummary) -> None:
        """A summary table of the run."""
        t = Table(title="osteoscan scan", show_header=False)
        t.add_column("", style="bold")
        t.add_column("")
        t.add_row("files", f"{s.n_files} ({s.n_ignored} ignored)")
        t.add_row("rows", str(s.rows))
        for k in ("ok", "skipped", "error", "flagged", "unchanged"):
            if k in s.counts or k != "unchanged":
                t.add_row(k, str(s.counts.get(k, 0)))
        t.add_row("time", f"{s.elapsed_s:.1f} s ({s.images_per_s:.1f} images/s)")
        t.add_row("model", _shown(", ".join(s.models)))
        t.add_row("device", _shown(f"{s.device}, {s.workers} workers, batch {s.batch_size}"))
        t.add_row("results", _shown(s.out) + (" (up to date)" if s.written == [] else ""))
        t.add_row("results hold", held(s))
        if s.dicom_results:
            t.add_row("DICOM results", _shown(s.dicom_results))
        if s.covariates:
            t.add_row("covariates", _shown(s.covariates))
        t.add_row("flagged", _shown(s.flagged_out))
        if s.hdf5:
            t.add_row("hdf5", _shown(s.hdf5))
        if s.heatmaps_dir:
            t.add_row("heatmaps", _shown(s.heatmaps_dir))
        self.console.print(t)
        for warning in s.warnings:
            self.console.print(f"[yellow]warning:[/] {_shown(warning)}", highlight=False)


def make_reporter(quiet: bool, console: Console | None = None) -> LogReporter | RichReporter:
    """Rich display on an interactive terminal, unless ``quiet``; log lines otherwise."""
    console = console or Console(stderr=True)
    if quiet or not console.is_terminal:
        return LogReporter(console)
    return RichReporter(console)
