"""What the review page shows, gathered from the results CSV and (read-only) the scan state.

The CSV is streamed once: only the flagged rows are kept whole (they are listed), the others
become counts, score/uncertainty arrays for the plots and a few example paths per problem, so
memory stays small over an archive of any size. The page therefore carries no more than the CSV.

Per-night trend: a *night* runs from noon to noon UTC and is named by the evening it starts on
(``2026-12-01T01:30:00Z`` and ``2026-11-30T23:50:00Z`` both belong to the night of
``2026-11-30``), so a run that crosses midnight stays one night.
"""

from __future__ import annotations

import contextlib
import csv
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from osteoscan.errors import UsageError
from osteoscan.rows import ResultRow, utc_now

STATUSES = ("ok", "skipped", "error", "missing")
EXAMPLES_PER_PROBLEM = 3
# A night is noon-to-noon UTC: going back 12 h makes the date of its evening the night's name.
NIGHT_SHIFT = timedelta(hours=12)
_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Cells beyond the csv module's 128 KB default exist in results written before hostile headers
# were cut (issue 17); they are read, then shown shortened.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


def parse_utc(text: str) -> datetime | None:
    """An osteoscan timestamp (``2026-11-30T01:30:12Z``) as an aware datetime, else ``None``."""
    try:
        return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def night_of(scanned_at: str) -> str:
    """The night (noon-to-noon UTC, named by its evening) of a timestamp; ``unknown`` if bad."""
    ts = parse_utc(scanned_at)
    return (ts - NIGHT_SHIFT).date().isoformat() if ts else "unknown"


@dataclass
class NightStats:
    """Rows scanned in one night, by outcome."""

    night: str
    rows: int = 0
    ok: int = 0
    flagged: int = 0
    error: int = 0
    skipped: int = 0
    first: str = ""  # earliest and latest scanned_at of the night
    last: str = ""

    @property
    def flag_rate(self) -> float:
        """Flagged among the scored (ok) rows; NaN when none was scored."""
        return self.flagged / self.ok if self.ok else float("nan")

    @property
    def error_rate(self) -> float:
        """Errors among all rows of the night."""
        return self.error / self.rows if self.rows else float("nan")


@dataclass
class ProblemGroup:
    """Errors or skips that share one reason."""

    status: str
    reason: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class RunInfo:
    """The run the page reports on. From a finished scan (exact) or the latest night (derived)."""

    night: str = ""
    started: str = ""
    ended: str = ""
    elapsed_s: float | None = None
    new: int | None = None
    unchanged: int | None = None
    counts: dict[str, int] = field(default_factory=dict)  # this run's ok/skipped/error/flagged
    exact: bool = False  # True: measured by the scan itself; False: derived from timestamps


@dataclass
class ReportData:
    """Everything the page and its plots need."""

    results: Path
    generated_at: str
    classes: list[str]
    totals: dict[str, int]
    flagged: list[ResultRow]  # highest score first
    scores: np.ndarray  # of every ok row
    uncertainties: np.ndarray  # NaN where unknown
    scored_flagged: np.ndarray  # bool, per ok row
    thresholds: list[float]  # distinct thresholds applied (image-only rows have their own)
    models: dict[str, int]  # model label -> rows it scored
    covariate_use: dict[str, int]  # "age,sex" / "" ... -> ok rows
    nights: list[NightStats]
    problems: list[ProblemGroup]  # largest first
    run: RunInfo
    state: Path | None = None


class _Nights:
    """Accumulates rows into :class:`NightStats` by night."""

    def __init__(self) -> None:
        self.by_night: dict[str, NightStats] = {}

    def add(self, scanned_at: str, status: str, flagged: bool) -> None:
        night = night_of(scanned_at)
        s = self.by_night.get(night) or self.by_night.setdefault(night, NightStats(night))
        s.rows += 1
        if status in ("ok", "error", "skipped"):
            setattr(s, status, getattr(s, status) + 1)
        s.flagged += bool(flagged)
        if scanned_at and (not s.first or scanned_at < s.first):
            s.first = scanned_at
        if scanned_at > s.last:
            s.last = scanned_at

    def sorted(self) -> list[NightStats]:
        return [self.by_night[k] for k in sorted(self.by_night)]


def read_rows(results: Path) -> Iterator[ResultRow]:
    """Rows of a results CSV, through :meth:`ResultRow.from_csv_cells` (any osteoscan version;
    the formula guard's leading ``'`` is undone: the page shows ``=1+1.jpg`` as text)."""
    old = csv.field_size_limit()
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        with open(results, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise UsageError(f"{results} is not an osteoscan results CSV (no path column)")
            for line in reader:
                yield ResultRow.from_csv_cells({k: v for k, v in line.items() if k is not None})
    except OSError as exc:
        raise UsageError(f"cannot read {results}: {exc.strerror or exc}") from exc
    finally:
        csv.field_size_limit(old)


def open_state_readonly(path: Path) -> sqlite3.Connection:
    """The state database opened read-only: the page never changes it, and it can be made
    while a scan holds the state (SQLite's WAL lets readers in)."""
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10.0)
        conn.execute("SELECT COUNT(*) FROM rows").fetchone()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"cannot read the scan state {path}: {exc}") from exc
    return conn


def state_nights(conn: sqlite3.Connection) -> list[NightStats]:
    """Per-night counts over every row the state holds (its whole history)."""
    nights = _Nights()
    for scanned_at, status, flagged in conn.execute("SELECT scanned_at, status, flagged FROM rows"):
        nights.add(str(scanned_at or ""), str(status or ""), bool(flagged))
    return nights.sorted()


def _problem_key(row: ResultRow) -> tuple[str, str]:
    # A reason often repeats the file's own path: group on the reason without it.
    reason = row.reason.replace(row.path, "<file>") if row.path else row.reason
    return row.status, reason.strip() or "(no reason given)"


def gather(
    results: str | Path,
    *,
    state: str | Path | None = None,
    run: RunInfo | None = None,
) -> ReportData:
    """Read ``results`` (and the ``state`` database, when given) into a :class:`ReportData`.

    ``run``: what a scan that just finished measured (``scan --report``); without it the run is
    derived from the latest night's timestamps.
    """
    results = Path(results)
    if not results.is_file():
        raise UsageError(f"no such results file: {results}")
    totals = dict.fromkeys((*STATUSES, "flagged", "rows"), 0)
    flagged: list[ResultRow] = []
    scores: list[float] = []
    uncert: list[float] = []
    scored_flag: list[bool] = []
    thresholds: set[float] = set()
    models: dict[str, int] = {}
    cov: dict[str, int] = {}
    classes: list[str] = []
    problems: dict[tuple[str, str], ProblemGroup] = {}
    nights = _Nights()
    for row in read_rows(results):
        totals["rows"] += 1
        totals[row.status] = totals.get(row.status, 0) + 1
        totals["flagged"] += row.is_flagged
        nights.add(row.scanned_at, row.status, row.is_flagged)
        classes += [c for c in row.probs if c not in classes]
        if row.is_flagged:
            flagged.append(row)
        if row.status == "ok" and row.score is not None:
            scores.append(row.score)
            uncert.append(np.nan if row.uncertainty is None else row.uncertainty)
            scored_flag.append(row.is_flagged)
            if row.threshold is not None:
                thresholds.add(round(row.threshold, 6))
            models[row.model] = models.get(row.model, 0) + 1
            cov[row.covariates] = cov.get(row.covariates, 0) + 1
        elif row.status in ("error", "skipped"):
            key = _problem_key(row)
            group = problems.get(key) or problems.setdefault(key, ProblemGroup(*key))
            group.count += 1
            if len(group.examples) < EXAMPLES_PER_PROBLEM:
                group.examples.append(row.path)
    flagged.sort(key=lambda r: (-(r.score or 0.0), r.path, r.frame))
    state_path = Path(state) if state is not None else None
    night_list = nights.sorted()
    if state_path is not None:
        conn = open_state_readonly(state_path)
        try:
            night_list = state_nights(conn) or night_list
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
    return ReportData(
        results=results, generated_at=utc_now(), classes=classes, totals=totals,
        flagged=flagged, scores=np.asarray(scores, np.float64),
        uncertainties=np.asarray(uncert, np.float64), scored_flagged=np.asarray(scored_flag, bool),
        thresholds=sorted(thresholds), models=dict(sorted(models.items(), key=lambda kv: -kv[1])),
        covariate_use=cov, nights=night_list,
        problems=sorted(problems.values(), key=lambda g: (-g.count, g.status, g.reason)),
        run=run or derive_run(night_list, totals["rows"]), state=state_path,
    )  # fmt: skip


def derive_run(nights: Iterable[NightStats], total_rows: int) -> RunInfo:
    """The latest night as "the run": its rows are new, every earlier row unchanged."""
    known = [n for n in nights if n.night != "unknown"]
    if not known:
        return RunInfo()
    last = known[-1]
    t0, t1 = parse_utc(last.first), parse_utc(last.last)
    return RunInfo(
        night=last.night, started=last.first, ended=last.last,
        elapsed_s=(t1 - t0).total_seconds() if t0 and t1 else None,
        new=last.rows, unchanged=max(0, total_rows - last.rows),
        counts={"ok": last.ok, "skipped": last.skipped, "error": last.error,
                "flagged": last.flagged},
    )  # fmt: skip
