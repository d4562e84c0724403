"""Write the review page: ``report.html`` and its asset folder ``report_files/`` beside it.

``report_files/`` holds the plots, the thumbnails, the model card pages and, when there are more
flagged rows than fit one page, the further pages of flagged rows (``flagged-002.html``…). The
main page shows the run, the plots, the problems and the first page of flagged rows. Every page
is self-contained (inline CSS, no script, no network); the folder can be copied or archived
with the page.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from osteoscan.atomic import write_bytes, write_text
from osteoscan.errors import UsageError
from osteoscan.review import plots as plotting
from osteoscan.review import sections as sec
from osteoscan.review.data import ReportData, RunInfo, gather, night_of, parse_utc
from osteoscan.review.markup import esc, page, url
from osteoscan.review.models import ModelInfo, describe_models
from osteoscan.review.thumbs import Thumb, make_thumbnails
from osteoscan.rows import utc_now
from osteoscan.scan.state import default_state_path

if TYPE_CHECKING:
    from osteoscan.scan.config import ScanConfig, ScanSummary

PAGE_SIZE = 200  # flagged rows per page: 200 rows with 400 thumbnails render in well under 1 s
_OWN_PAGE = re.compile(r"flagged-\d{3,}\.html")
_OWN_THUMB = re.compile(r"[0-9a-f]{24}-(plain|heatmap)\.jpg")


@dataclass
class ReportResult:
    """What :func:`write_report` wrote."""

    html: Path
    folder: Path
    rows: int
    flagged: int
    pages: int
    thumbnails: int
    seconds: float


def assets_folder(html: str | Path) -> Path:
    """``report.html`` → ``report_files/`` next to it (plots, thumbnails, further pages)."""
    html = Path(html)
    return html.with_name(f"{html.stem}_files")


def default_heatmaps_dir(html: str | Path) -> Path:
    """Where ``scan --report`` keeps heatmap PNGs when ``--heatmaps`` is not given."""
    return assets_folder(html) / "heatmaps"


def _resolve_state(results: Path, state: str | Path | None) -> Path | None:
    if state is None:
        guess = default_state_path(results)
        return guess if guess.is_file() else None
    if not Path(state).is_file():
        raise UsageError(f"no such state file: {state}")
    return Path(state)


def _prune(folder: Path, pattern: re.Pattern[str], keep: set[str]) -> None:
    """Remove files of an earlier report that this one no longer names (only osteoscan's own
    names are ever touched)."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if pattern.fullmatch(f.name) and f.name not in keep and f.is_file():
            f.unlink(missing_ok=True)


def _page_href(n: int, html_name: str, rel: str, *, from_main: bool) -> str:
    if n == 1:
        return (url(html_name) if from_main else url(f"../{html_name}")) + "#flagged"
    name = f"flagged-{n:03d}.html"
    return url(f"{rel}/{name}" if from_main else name)


def _flagged_section(
    data: ReportData, thumbs: dict[str, Thumb], n: int, n_pages: int, page_size: int,
    prefix: str, page_dir: Path, hrefs: dict[int, str],
) -> str:  # fmt: skip
    start = (n - 1) * page_size
    chunk = data.flagged[start : start + page_size]
    items = "".join(
        sec.flagged_row(r, start + i + 1, thumbs.get(r.image_id), prefix, page_dir)
        for i, r in enumerate(chunk)
    )
    pages = sec.pager(n, n_pages, hrefs)
    shown = f"{start + 1}–{start + len(chunk)} of {len(data.flagged)}" if chunk else "none"
    return (
        f'<section id="flagged"><h2>Flagged images, highest score first ({shown})</h2>{pages}'
        f'<ol class="flagged">{items}</ol>{pages}</section>'
    )


def _footer() -> str:
    return (
        "<footer>Privacy: this page carries what the results CSV carries (file paths and image "
        "IDs, no patient names or IDs). Thumbnails and heatmaps are pixels and can show text "
        "burned into the images: treat this page and its folder like the images themselves. "
        "osteoscan — research software, not for clinical use.</footer>"
    )


def write_report(
    results: str | Path,
    html: str | Path,
    *,
    state: str | Path | None = None,
    heatmaps: str | Path | None = None,
    page_size: int = PAGE_SIZE,
    run: RunInfo | None = None,
) -> ReportResult:
    """Write the review page of ``results`` to ``html`` (and its asset folder).

    ``state``: the scan state (default ``<results stem>.state.sqlite`` when it exists), read
    only, for the per-night history. ``heatmaps``: the scan's ``--heatmaps`` folder (default:
    the asset folder's ``heatmaps/`` when present, else each row's ``heatmap`` column).
    ``run``: what a scan that just ended measured (see :func:`report_after_scan`).
    """
    t0 = time.perf_counter()
    if page_size < 1:
        raise UsageError("--page-size must be at least 1")
    results, html = Path(results), Path(html)
    data = gather(results, state=_resolve_state(results, state), run=run)
    folder = assets_folder(html)
    rel, prefix = folder.name, f"{folder.name}/"
    hm_dir = Path(heatmaps) if heatmaps is not None else default_heatmaps_dir(html)
    if heatmaps is not None and not hm_dir.is_dir():
        raise UsageError(f"no such heatmaps folder: {heatmaps}")
    thumbs = make_thumbnails(data.flagged, hm_dir if hm_dir.is_dir() else None,
                             results.parent, folder / "thumbs")  # fmt: skip
    models = describe_models(data.models, folder, rel, html.name)
    plot_files = _write_plots(data, folder, _threshold_labels(data.thresholds, models))
    n_pages = max(1, -(-len(data.flagged) // page_size))
    main_hrefs = {n: _page_href(n, html.name, rel, from_main=True) for n in range(1, n_pages + 1)}
    sub_hrefs = {n: _page_href(n, html.name, rel, from_main=False) for n in range(1, n_pages + 1)}
    title = f"osteoscan report: night of {data.run.night or data.generated_at[:10]}"
    body = "".join([
        f"<h1>{esc(title)}</h1>", sec.banner(), sec.meaning(models, data.covariate_use, prefix),
        '<nav class="toc"><a href="#run">The run</a><a href="#plots">Plots</a>'
        '<a href="#problems">Errors and skips</a><a href="#flagged">Flagged images</a></nav>',
        sec.run_summary(data, models, prefix), sec.plots(plot_files, prefix, len(data.nights)),
        sec.problems(data.problems),
        _flagged_section(data, thumbs, 1, n_pages, page_size, prefix, html.parent, main_hrefs),
        _footer(),
    ])  # fmt: skip
    pages = {f"flagged-{n:03d}.html" for n in range(2, n_pages + 1)}
    for n in range(2, n_pages + 1):
        sub = "".join([
            f'<h1>{esc(title)}</h1><p><a href="{url("../" + html.name)}">← back to the report'
            "</a></p>", sec.banner(),
            _flagged_section(data, thumbs, n, n_pages, page_size, "", folder, sub_hrefs),
            _footer(),
        ])  # fmt: skip
        write_text(folder / f"flagged-{n:03d}.html", page(f"{title}, page {n}", sub))
    _prune(folder, _OWN_PAGE, pages)
    _prune(folder / "thumbs", _OWN_THUMB,
           {Path(p).name for t in thumbs.values() for p in (t.plain, t.overlay) if p})  # fmt: skip
    write_text(html, page(title, body))
    return ReportResult(html, folder, data.totals["rows"], len(data.flagged), n_pages,
                        len(thumbs), time.perf_counter() - t0)  # fmt: skip


def _threshold_labels(thresholds: list[float], models: list[ModelInfo]) -> dict[float, str]:
    """Name each threshold met in the rows after the model setting it is (image-only rows use
    their own threshold)."""
    out = {}
    for t in thresholds:
        label = "threshold"
        for m in models:
            if m.image_only_threshold is not None and abs(m.image_only_threshold - t) < 1e-6:
                label = "image-only threshold"
            elif m.threshold is not None and abs(m.threshold - t) < 1e-6:
                label = "threshold (with age/sex)" if m.image_only_threshold else "threshold"
        out[t] = label
    return out


def _write_plots(data: ReportData, folder: Path, thresholds: dict[float, str]) -> dict[str, str]:
    figures = {
        "score": ("score-distribution.png",
                  plotting.score_histogram(data.scores, data.scored_flagged, thresholds)),
        "nights": ("nights.png", plotting.night_trend(data.nights)),
        "uncertainty": ("uncertainty.png", plotting.uncertainty_scatter(
            data.scores, data.uncertainties, data.scored_flagged, thresholds)),
    }  # fmt: skip
    for name, png in figures.values():
        write_bytes(folder / name, png)
    return {key: name for key, (name, _) in figures.items()}


def report_after_scan(cfg: ScanConfig, summary: ScanSummary, html: str | Path) -> ReportResult:
    """The review page at the end of ``osteoscan scan --report HTML``: the run's own numbers
    (duration, new rows, unchanged files) instead of ones derived from timestamps."""
    ended = utc_now()
    end_ts = parse_utc(ended)
    started = ""
    if end_ts is not None:
        start_ts = end_ts - timedelta(seconds=round(summary.elapsed_s))
        started = start_ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    run = RunInfo(
        night=night_of(ended), started=started, ended=ended, elapsed_s=summary.elapsed_s,
        new=summary.rows, unchanged=summary.counts.get("unchanged", 0),
        counts={k: summary.counts.get(k, 0) for k in ("ok", "skipped", "error", "flagged")},
        exact=True,
    )  # fmt: skip
    return write_report(cfg.out, html, state=cfg.state, heatmaps=cfg.heatmaps_dir, run=run)


__all__ = ["ModelInfo", "ReportResult", "assets_folder", "default_heatmaps_dir",
           "report_after_scan", "write_report"]  # fmt: skip
