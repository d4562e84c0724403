"""Model report figures: ROC, confusion matrix and training curves (``report/*.png``).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot global state, no
display needed) and returned as PNG bytes, ready for ``save_package(..., report={name: bytes})``.
The model card (``card.md``) is written by :mod:`osteoscan.card`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def roc_png(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_classes: Sequence[str],
    title: str = "ROC curves (held-out test)",
) -> bytes:
    """ROC of the screening score (positive classes vs rest, bold) and of each class vs rest."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pos = np.array([c in set(positive_classes) for c in classes])
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    curves = [
        (f"{'+'.join(positive_classes)} vs rest (screening)", pos[y], probs[:, pos].sum(1), 2.5)
    ]
    if len(classes) > 2:
        # A single positive class's own curve is the screening curve: draw it once.
        curves += [
            (f"{c} vs rest", y == i, probs[:, i], 1.0)
            for i, c in enumerate(classes)
            if list(positive_classes) != [c]
        ]
    for label, truth, score, lw in curves:
        if truth.all() or not truth.any():
            continue  # one class only: the curve is undefined
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, lw=lw, label=label)
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    if len(ax.lines) > 1:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", transform=ax.transAxes)
    return _png(fig)


def confusion_png(matrix: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str]) -> bytes:
    """Confusion matrix heat map (rows true class, columns predicted), counts and row %."""
    cm = np.asarray(matrix, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    fig = Figure(figsize=(1.6 * len(classes) + 2, 1.4 * len(classes) + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if frac[i, j] > 0.6 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(classes)), labels=list(classes), rotation=20)
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set(xlabel="predicted (most probable class)", ylabel="true class", title="Confusion matrix")
    return _png(fig)


def training_curves_png(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Training curves from per-epoch dicts (``epoch`` plus numeric keys such as ``train_loss``,
    ``val_loss``, ``val_auc``, ``lr``); an optional ``member`` key gives one line per member.
    Keys containing ``loss`` go to the left panel, everything else except ``lr`` to the right."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_metric = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for k, row in enumerate(history):
        x = float(row.get("epoch", k))
        member = str(row.get("member", ""))
        for key, val in row.items():
            if key in ("epoch", "member", "lr", "stage") or isinstance(val, bool):
                continue
            if isinstance(val, (int, float)) and np.isfinite(val):
                xs, ys = series.setdefault((member, key), ([], []))
                xs.append(x)
                ys.append(float(val))
    for (member, key), (xs, ys) in sorted(series.items()):
        ax = ax_loss if "loss" in key else ax_metric
        ax.plot(xs, ys, marker=".", label=f"{member} {key}".strip())
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation metrics")):
        ax.set(xlabel="epoch", title=title)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def render_report(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_classes: Sequence[str],
    history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, bytes]:
    """All report figures as ``{file name: PNG bytes}`` for the package's ``report/`` folder."""
    y = np.asarray(y_true, dtype=np.int64)
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (y, np.asarray(probs).argmax(axis=1)), 1)
    out = {
        "roc.png": roc_png(y, probs, classes, positive_classes),
        "confusion_matrix.png": confusion_png(cm, classes),
    }
    if history:
        out["training_curves.png"] = training_curves_png(history)
    return out
