"""The sections of the review page, each a function from gathered data to escaped markup.

``prefix`` is the way from the page being written to the report's asset folder: ``"r_files/"``
from ``r.html``, ``""`` from a flagged-rows page inside that folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from osteoscan.review.data import ProblemGroup, ReportData, RunInfo
from osteoscan.review.markup import esc, url
from osteoscan.review.models import ModelInfo
from osteoscan.review.thumbs import Thumb
from osteoscan.rows import ResultRow

PROBLEM_GROUPS_SHOWN = 40
PATH_LIMIT = 1000  # archive paths can be long; other values are cut at markup.MAX_CELL


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def duration(seconds: float | None) -> str:
    """``3725`` → ``1 h 2 min 5 s``."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{h} h"] * bool(h) + [f"{m} min"] * bool(m or h) + [f"{s} s"]
    return " ".join(parts)


def banner() -> str:
    """The not-for-clinical-use banner."""
    return (
        '<div class="banner"><strong>Research software: not for clinical use.</strong> A flag '
        "is a suggestion to consider a DXA referral, not a diagnosis. Scores come from a small "
        "model with wide uncertainty: read the model card before acting on them.</div>"
    )


def meaning(models: Sequence[ModelInfo], covariate_use: Mapping[str, int], prefix: str) -> str:
    """What the scores mean: each model, its card, what its image adds; where age/sex came from."""
    items = []
    for m in models:
        card = (f' (<a href="{url(prefix + m.card_file)}">model card</a>)' if m.card_file
                else " (model not installed here: no card)" if not m.installed else "")  # fmt: skip
        if m.installed and not m.version_matches:
            card += " — the installed package is another version"
        cov = ", ".join(m.covariates) if m.covariates else "none (image only)"
        facts = [f"{m.rows} scored rows"]
        if m.installed:
            facts.append(f"covariates used: {esc(cov)}; threshold {_num(m.threshold)}")
        if m.image_only_threshold is not None:
            facts.append(f"{_num(m.image_only_threshold)} for images scored without age/sex")
        lines = "".join(f"<li>{esc(line, 600)}</li>" for line in m.meaning)
        items.append(f"<li><b>{esc(m.label)}</b>{card}: {'; '.join(facts)}."
                     f"<ul>{lines}</ul></li>")  # fmt: skip
    scored = sum(covariate_use.values())
    both = covariate_use.get("age,sex", 0)
    alone = covariate_use.get("", 0)
    cov_line = (
        f"<p>Of {scored} scored images, {both} were scored with age and sex and {alone} from the "
        "image alone (the <i>covariates</i> of each flagged row says which); image-only scores "
        "are nearly uninformative.</p>"
        if scored
        else ""
    )
    return (
        '<section class="meaning"><h3>What the scores mean</h3><p>The score is the model\'s '
        "probability of the screening-positive classes; an image is flagged when its score "
        "reaches the threshold. Age and sex carry most of the signal of the bundled model: a "
        "high score may reflect them more than the image. Heatmaps show what drove a score, not "
        f"where disease is.</p><ul>{''.join(items)}</ul>{cov_line}</section>"
    )


def _counts(counts: Mapping[str, int], keys: Sequence[tuple[str, str]]) -> str:
    boxes = "".join(
        f'<div class="count{" flag" if k == "flagged" else ""}"><b>{esc(counts.get(k, 0))}</b>'
        f"<span>{esc(label)}</span></div>"
        for k, label in keys
    )
    return f'<div class="counts">{boxes}</div>'


def run_summary(data: ReportData, models: Sequence[ModelInfo], prefix: str) -> str:
    """The run: when, how long, which models, this run's counts and what the results hold."""
    run: RunInfo = data.run
    how = "measured by the scan" if run.exact else "from the rows' timestamps (latest night)"
    unchanged = "unchanged files" if run.exact else "rows from earlier nights"
    model_cells = ", ".join(
        f'<a href="{url(prefix + m.card_file)}">{esc(m.label)}</a>' if m.card_file
        else esc(m.label) for m in models) or "–"  # fmt: skip
    rows = [
        ("results", f'<span class="mono">{esc(data.results.name)}</span>'),
        ("night of", esc(run.night or "–")),
        ("run", f"{esc(run.started or '–')} → {esc(run.ended or '–')} "
                f"({esc(duration(run.elapsed_s))}, {how})"),
        ("models", model_cells),
        ("new rows this run", esc("–" if run.new is None else run.new)),
        (unchanged, esc("–" if run.unchanged is None else run.unchanged)),
        ("page written", esc(data.generated_at)),
    ]  # fmt: skip
    table = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    keys = (("ok", "ok"), ("skipped", "skipped"), ("error", "error"), ("flagged", "flagged"))
    total_keys = (("rows", "rows in all"), *keys, ("missing", "missing (file gone)"))
    return (
        f'<section id="run"><h2>The run</h2><table class="kv">{table}</table>'
        f"<h3>This run</h3>{_counts(run.counts, keys)}"
        f"<h3>What the results hold (all nights)</h3>{_counts(data.totals, total_keys)}</section>"
    )


def plots(files: Mapping[str, str], prefix: str, n_nights: int) -> str:
    """The three plots (files relative to the asset folder) with captions."""
    captions = {
        "score": "Scores of every scored image; the dashed line is the threshold (image-only "
        "rows may have their own, dotted).",
        "nights": f"One point per night ({n_nights}): a jump in flags or errors usually means a "
        "new scanner, a changed export or a broken mount, not an epidemic.",
        "uncertainty": "Spread of the ensemble members' scores: high means the members disagree.",
    }
    figs = "".join(
        f'<figure><img src="{url(prefix + f)}" alt="{esc(key)} plot" width="614">'
        f"<figcaption>{esc(captions.get(key, ''))}</figcaption></figure>"
        for key, f in files.items()
    )
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{figs}</div></section>'


def problems(groups: Sequence[ProblemGroup]) -> str:
    """Errors and skips grouped by reason, with counts and a few example paths."""
    if not groups:
        return '<section id="problems"><h2>Errors and skips</h2><p>None.</p></section>'
    shown = groups[:PROBLEM_GROUPS_SHOWN]

    def examples(g: ProblemGroup) -> str:
        return "".join(f'<li class="mono">{esc(p, PATH_LIMIT)}</li>' for p in g.examples)

    rows = "".join(
        f'<tr><td>{esc(g.status)}</td><td class="n">{g.count}</td><td>{esc(g.reason, 500)}</td>'
        f"<td><ul>{examples(g)}</ul></td></tr>"
        for g in shown
    )
    more = len(groups) - len(shown)
    rest = (f"<p class=muted>{more} more reasons ({sum(g.count for g in groups[len(shown):])} "
            "rows): see the results CSV.</p>" if more > 0 else "")  # fmt: skip
    return (
        '<section id="problems"><h2>Errors and skips</h2><table class="problems"><tr>'
        "<th>status</th><th>rows</th><th>reason</th><th>examples</th></tr>"
        f"{rows}</table>{rest}</section>"
    )


def _thumbs(row: ResultRow, rank: int, thumb: Thumb | None, prefix: str, page_dir: Path) -> str:
    if thumb is None or thumb.plain is None or thumb.overlay is None:
        note = "no heatmap PNG (scan with --heatmaps DIR, or pass --heatmaps to report)"
        return f'<div class="thumbs"><div class="ph">{esc(note)}</div></div>'
    link = None
    if thumb.source is not None:
        try:
            link = os.path.relpath(thumb.source, page_dir)
        except ValueError:  # another drive (Windows): no link
            link = None
    figs = []
    for src, caption in ((thumb.plain, "radiograph"), (thumb.overlay, "Grad-CAM overlay")):
        img = (f'<img src="{url(prefix + src)}" alt="{esc(caption)} #{rank}" width="164" '
               'height="164" loading="lazy">')  # fmt: skip
        if link and caption != "radiograph":
            img = f'<a href="{url(link)}">{img}</a>'
        figs.append(f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>")
    return f'<div class="thumbs">{"".join(figs)}</div>'


def _probs(row: ResultRow) -> str:
    cells = "".join(
        f'<tr><td>{esc(c)}</td><td><meter min="0" max="1" value="{_num(p, 4)}"></meter>'
        f"</td><td>{_num(p)}</td></tr>"
        for c, p in row.probs.items()
    )
    return f'<table class="probs">{cells}</table>'


def flagged_row(row: ResultRow, rank: int, thumb: Thumb | None, prefix: str, page_dir: Path) -> str:
    """One flagged image: thumbnails, probabilities, score vs threshold, provenance."""
    margin = (row.score or 0.0) - (row.threshold or 0.0)
    cov = row.covariates.replace(",", ", ") if row.covariates else "none: image only"
    frame = f", frame {row.frame}" if row.frame else ""
    facts = [
        ("score", f'<span class="score">{_num(row.score)}</span> ≥ threshold '
                  f"{_num(row.threshold)} (+{_num(margin)})"),
        ("probabilities", _probs(row)),
        ("prediction", esc(row.prediction or "–")),
        ("uncertainty", f"{_num(row.uncertainty)} <span class=muted>(std of members' scores)"
                        "</span>"),
        ("covariates", esc(cov)),
        ("path", f'<span class="mono">{esc(row.path, PATH_LIMIT)}</span>'),
        ("image_id", f'<span class="mono">{esc(row.image_id)}</span>{esc(frame)}'),
        ("body part, model", f"{esc(row.body_part)}, {esc(row.model)}"),
        ("scanned", esc(row.scanned_at)),
    ]  # fmt: skip
    table = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in facts)
    return (
        f'<li class="row" id="r{rank}"><div class="rank">{rank}</div>'
        f"{_thumbs(row, rank, thumb, prefix, page_dir)}"
        f'<div class="facts"><table>{table}</table></div></li>'
    )


def pager(current: int, total: int, href: Mapping[int, str]) -> str:
    """Links to every page of flagged rows (``href``: page number → URL, already escaped)."""
    if total <= 1:
        return ""
    links = "".join(
        f'<span class="here">{n}</span>' if n == current else f'<a href="{href[n]}">{n}</a>'
        for n in range(1, total + 1)
    )
    return f'<nav class="pager" aria-label="pages of flagged rows">pages: {links}</nav>'
