"""Model report figures (ROC, confusion matrix, training curves) and the model card (``card.md``).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot global state, no
display needed) and returned as PNG bytes, ready for ``save_package(..., report={name: bytes})``.
"""

from __future__ import annotations

import io
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from osteoscan.metrics import format_metrics_table

KNEE_XRAY_SOURCE: dict[str, str] = {
    "name": "Knee X-ray Osteoporosis Database (development part)",
    "citation": "Wani, I. M.; Arora, S. (2021). Knee X-ray Osteoporosis Database. "
    "Mendeley Data, v2.",
    "doi": "10.17632/fxjm8fb6mw.2",
    "url": "https://doi.org/10.17632/fxjm8fb6mw.2",
    "licence": "CC BY 4.0 (attribution required; the upstream README reportedly says "
    "research use only)",
    "label_source": "T-score category per patient (normal T > -1, osteopenia -2.5 < T <= -1, "
    "osteoporosis T <= -2.5), reportedly measured by quantitative ultrasound (QUS), not DXA",
}

METRIC_SETS: dict[str, str] = {
    "image_only": "Image only",
    "covariates_only": "Covariates only (age, sex)",
    "combined": "Image + covariates",
}


def detect_source(data: str | Path) -> dict[str, str] | None:
    """Known public data set behind ``data`` (for citation in the card), or ``None``."""
    root = Path(data)
    root = root if root.is_dir() else root.parent
    readme = root / "README.md"
    try:
        text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    except OSError:
        text = ""
    if "fxjm8fb6mw" in text or "Knee X-ray Osteoporosis Database" in text:
        return dict(KNEE_XRAY_SOURCE)
    if root.name == "knee-xray" and (root / "patient_details.csv").is_file():
        return dict(KNEE_XRAY_SOURCE)
    return None


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


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine a model's numbers."""
    out = {"python": platform.python_version()}
    for pkg in (
        "osteoscan",
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "scikit-learn",
        "opencv-python-headless",
        "pydicom",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _metric_sets(metrics: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not metrics:
        return {}
    if "n" in metrics and "accuracy" in metrics:
        return {"image_only": metrics}
    return {k: v for k, v in metrics.items() if isinstance(v, Mapping) and "accuracy" in v}


def _row_key(label: str) -> str:
    """A metric label without its " @ threshold" suffix: "x (a vs rest @ 0.2)" → "x (a vs rest)".

    Labels without a threshold are kept whole (their closing parenthesis included).
    """
    if " @ " not in label:
        return label
    return label.split(" @ ")[0] + ")"


def _metrics_section(metrics: Mapping[str, Any] | None) -> list[str]:
    sets = _metric_sets(metrics)
    if not sets:
        return ["No held-out metrics were computed for this model."]
    names = list(sets)
    # Each variant has its own threshold, so labels differ in their "@ t" suffix: key rows by the
    # label without it, and list the thresholds once below the table.
    tables = {
        k: {_row_key(r[0]): r for r in rows}
        for k, rows in ((k, format_metrics_table(dict(v))) for k, v in sets.items())
    }
    first = tables[names[0]]
    lines = ["| metric | " + " | ".join(METRIC_SETS.get(k, k) for k in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for label in first:
        cells = []
        for k in names:
            row = tables[k].get(label)
            cells.append("" if row is None else (f"{row[1]} ({row[2]})" if row[2] else row[1]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    thresholds = [
        f"{METRIC_SETS.get(k, k)} {float(v['threshold']):.3f}"
        for k, v in sets.items()
        if isinstance(v.get("threshold"), (int, float))
    ]
    lines += ["", "Values are point estimates with bootstrap 95 % intervals in parentheses."]
    if thresholds:
        lines.append(
            "Screening thresholds (chosen for the target sensitivity): "
            + ", ".join(thresholds)
            + "."
        )
    return lines


def _auc(m: Mapping[str, Any] | None) -> tuple[float, float, float] | None:
    """(value, ci low, ci high) of the positive-vs-rest ROC-AUC, or None when absent/undefined."""
    try:
        a = m["roc_auc"]  # type: ignore[index]
        v, (lo, hi) = float(a["value"]), a["ci95"]
        out = (v, float(lo), float(hi))
    except (KeyError, TypeError, ValueError):
        return None
    return out if all(x == x for x in out) else None  # NaN (single-class data) → None


def _added_value(metrics: Mapping[str, Any] | None, positive: str = "positive") -> list[str]:
    """Plain-language verdict on what the image adds, from the numbers in the table.

    Stated on every card so a reader cannot miss that, e.g., the image-only model is at chance
    level or that the combined model is no better than age and sex alone.
    """
    sets = _metric_sets(metrics)
    img, cov, comb = (_auc(sets.get(k)) for k in ("image_only", "covariates_only", "combined"))
    lines: list[str] = []
    if img is not None:
        v, lo, hi = img
        if lo <= 0.5:
            lines.append(
                f"- **Image only:** ROC-AUC {v:.3f} ({lo:.3f} – {hi:.3f}); the interval includes "
                "0.5, so the image model is not distinguishable from chance on this data."
            )
        else:
            lines.append(f"- **Image only:** ROC-AUC {v:.3f} ({lo:.3f} – {hi:.3f}), above chance.")
    if cov is not None and comb is not None:
        d = comb[0] - cov[0]
        verdict = (
            "the image adds nothing measurable over age and sex; the score is driven by them"
            if d < 0.02
            else "a gain over age and sex alone, within the noise of this small data set"
            if comb[1] <= cov[0]
            else "a gain over age and sex alone"
        )
        lines.append(
            f"- **Image + covariates vs covariates only:** ROC-AUC {comb[0]:.3f} vs {cov[0]:.3f} "
            f"(difference {d:+.3f}): {verdict}."
        )
    return ["", f"What the image adds ({positive} vs rest):", *lines] if lines else []


def write_card(
    manifest: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    data_summary: Mapping[str, Any] | None,
    command: str,
) -> str:
    """The model card (markdown) for a package.

    ``manifest``: the manifest as a dict. ``metrics``: one :func:`classification_metrics` dict or
    ``{"image_only": m, "covariates_only": m, "combined": m}`` (any subset). ``data_summary``:
    optional keys ``source`` (dict as :data:`KNEE_XRAY_SOURCE`, see :func:`detect_source`),
    ``data`` (path given), ``counts`` (class -> images), ``duplicates``
    (:meth:`DedupResult.summary`), ``split`` (method and part sizes), ``covariates`` (where they
    came from, coverage), ``label_source``. ``command``: the exact command line.
    """
    ds = dict(data_summary or {})
    m = dict(manifest)
    src = ds.get("source") or {}
    classes = m.get("classes", [])
    pos = m.get("positive_classes", [])
    members = m.get("members", [])
    lines = [
        f"# Model card: {m.get('name', 'osteoscan model')} {m.get('version', '')}".rstrip(),
        "",
    ]
    lines += [
        "> **NOT FOR CLINICAL USE.** Research software. This model has not been validated for",
        "> diagnosis or treatment decisions; a flag is a suggestion to consider DXA, not a",
        "> diagnosis.",
        "",
        "## Intended use",
        f"Batch screening of {', '.join(m.get('body_parts', ['knee']))} radiographs in research "
        f"archives to find images suggestive of {' or '.join(pos) or 'low bone density'}, so that "
        "the patients can be considered for a DXA referral. Classes: "
        f"{', '.join(classes)}. Screening score = probability of {' + '.join(pos)}; flagged "
        f"when score >= {m.get('threshold', 'n/a')} (chosen on validation data for a target "
        f"sensitivity of {m.get('target_sensitivity', 'n/a')}).",
        "",
        "## Model",
        f"- Ensemble of {len(members)} member(s): "
        + ", ".join(
            f"{x.get('arch')}" + (f" (fold {x['fold']})" if x.get("fold") is not None else "")
            for x in members
        ),
        f"- Input: {m.get('preprocess', {})}",
        f"- Covariates used: {', '.join(m.get('covariates', [])) or 'none (image only)'}",
        "",
        "## Training data",
    ]
    if src:
        lines += [
            f"- Source: {src.get('name', '')}. {src.get('citation', '')} doi:{src.get('doi', '')}",
            f"- Licence: {src.get('licence', 'unknown')}. Cite the source when using this model.",
        ]
    else:
        lines.append(f"- Source: {ds.get('data', 'user-supplied data')} (licence: as supplied).")
    label_source = ds.get("label_source") or src.get("label_source") or "as supplied by the user"
    lines.append(f"- Label source: {label_source}.")
    if ds.get("counts"):
        lines.append(
            "- Images per class: " + ", ".join(f"{k} {v}" for k, v in ds["counts"].items())
        )
    dup = ds.get("duplicates") or {}
    if dup:
        lines.append(
            f"- Duplicates: {dup.get('n_duplicate_groups', 0)} duplicate groups found "
            f"(byte-identical, identical pixels or verified near-duplicates), "
            f"{dup.get('n_conflicting_groups', 0)} with conflicting labels; "
            f"{dup.get('n_dropped', 0)} images of conflicting groups removed; every group kept "
            "on one side of every split."
        )
    if ds.get("split"):
        lines.append(f"- Split: {ds['split']}")
    if ds.get("covariates"):
        lines.append(f"- Covariates: {ds['covariates']}")
    lines += ["", "## Held-out metrics", ""]
    lines += _metrics_section(metrics)
    lines += _added_value(metrics, " + ".join(pos) or "positive")
    lines += [
        "",
        "Sensitivity, specificity, precision and F1 are for the screening decision (positive "
        "classes vs the rest at the stored threshold); accuracy is multi-class (most probable "
        "class). Covariates-only shows what age and sex alone achieve: the image's added value is "
        "the difference to the combined model.",
        "",
        "## Known failure modes and limitations",
        "- Small, single-source training data: wide confidence intervals; performance on other "
        "scanners, hospitals, populations and post-processing is unknown.",
        "- Labels are T-score categories; if they come from quantitative ultrasound (as reported "
        "for the knee data set) they agree only moderately with DXA.",
        "- Only the body parts listed above; other views (lateral, skyline), children, implants, "
        "fractures, casts and heavy annotations are outside the training distribution.",
        "- Age and sex carry much of the signal; a high score may reflect them more than the "
        "image.",
        "- Grad-CAM heatmaps show what drove the score, not where disease is.",
        "",
        "## Reproduction",
        "```",
        command,
        "```",
        "Software: " + ", ".join(f"{k} {v}" for k, v in software_versions().items()),
        f"Created: {m.get('created_at', '')}",
        "",
    ]
    return "\n".join(lines)
