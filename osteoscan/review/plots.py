"""The review page's plots, drawn with matplotlib's object API on the Agg canvas (no display, no
pyplot global state) and returned as PNG bytes: score distribution with the threshold(s),
flag and error rate per night, uncertainty against score."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from osteoscan.review.data import NightStats

FLAG_COLOUR = "#c0392b"
OK_COLOUR = "#2f6f9f"
ERROR_COLOUR = "#7f4fa0"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def _empty(ax: object, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,  # type: ignore[attr-defined]
            color="grey")  # fmt: skip


def _thresholds(ax: object, thresholds: Mapping[float, str]) -> None:
    for i, (t, label) in enumerate(sorted(thresholds.items())):
        ax.axvline(t, color="black", ls="--" if i == 0 else ":", lw=1.2,  # type: ignore[attr-defined]
                   label=f"{label} {t:.3f}")  # fmt: skip


def score_histogram(
    scores: np.ndarray, flagged: np.ndarray, thresholds: Mapping[float, str]
) -> bytes:
    """Histogram of the scored rows' scores, flagged rows in red, each threshold (value → label)
    a dashed or dotted line."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    if scores.size:
        bins = np.linspace(0.0, 1.0, 41).tolist()
        ax.hist([scores[~flagged], scores[flagged]], bins=bins, stacked=True,
                color=[OK_COLOUR, FLAG_COLOUR], label=["not flagged", "flagged"])  # fmt: skip
        _thresholds(ax, thresholds)
        ax.legend(fontsize=8, loc="upper right")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _empty(ax, "no scored images")
    ax.set(xlim=(0, 1), xlabel="score (probability of the screening-positive classes)",
           ylabel="images", title=f"Score distribution ({scores.size} scored images)")  # fmt: skip
    return _png(fig)


def night_trend(nights: Sequence[NightStats]) -> bytes:
    """Flag rate (of scored rows, top) and error rate (of all rows, bottom) per night, one point
    a night; two panels so a small error rate is not flattened by the flag rate's scale."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    known = [n for n in nights if n.night != "unknown"]
    fig.suptitle(f"Per night ({len(known)} nights, noon-to-noon UTC)", fontsize=11)
    if not known:
        _empty(top, "no dated rows")
        return _png(fig)
    x = np.arange(len(known))
    for ax, values, colour, label in (
        (top, [100 * n.flag_rate for n in known], FLAG_COLOUR, "flagged, % of scored"),
        (bottom, [100 * n.error_rate for n in known], ERROR_COLOUR, "errors, % of rows"),
    ):
        ax.plot(x, values, marker="o", color=colour)
        ax.set_ylabel(label, fontsize=8)
        finite = [v for v in values if np.isfinite(v)]
        ax.set_ylim(0, max(1.0, max(finite, default=0.0) * 1.15))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    step = max(1, len(known) // 12)  # at most ~12 date labels
    bottom.set_xticks(x[::step], [n.night for n in known][::step], rotation=30, ha="right")
    bottom.set_xlim(-0.5, len(known) - 0.5)
    return _png(fig)


def uncertainty_scatter(
    scores: np.ndarray,
    uncertainties: np.ndarray,
    flagged: np.ndarray,
    thresholds: Mapping[float, str],
) -> bytes:
    """Members' disagreement (uncertainty) against score; flagged rows in red."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("Uncertainty vs score")
    known = np.isfinite(uncertainties)
    if known.any():
        for mask, colour, label in ((~flagged, OK_COLOUR, "not flagged"),
                                    (flagged, FLAG_COLOUR, "flagged")):  # fmt: skip
            m = mask & known
            ax.scatter(scores[m], uncertainties[m], s=16, alpha=0.7, color=colour, label=label,
                       rasterized=True, linewidths=0)  # fmt: skip
        _thresholds(ax, thresholds)
        fig.legend(fontsize=8, loc="outside lower center", ncols=2)
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no uncertainty recorded")
    ax.set(xlim=(0, 1), xlabel="score", ylabel="uncertainty (std of members' scores)")  # fmt: skip
    return _png(fig)
