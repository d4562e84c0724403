"""The model card (``card.md``): intended use, model, training data, held-out metrics, limits.

Plain markdown built from the manifest, the metrics of :mod:`osteoscan.metrics` and a summary of
the training data; :func:`detect_source` recognises the public data set behind a training folder so
the card can cite it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

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


_LIMITATIONS = [
    "## Known failure modes and limitations",
    "- Small, single-source training data: wide confidence intervals; performance on other "
    "scanners, hospitals, populations and post-processing is unknown.",
    "- Labels are T-score categories; if they come from quantitative ultrasound (as reported "
    "for the knee data set) they agree only moderately with DXA.",
    "- Only the body parts listed above; other views (lateral, skyline), children, implants, "
    "fractures, casts and heavy annotations are outside the training distribution.",
    "- Age and sex carry much of the signal; a high score may reflect them more than the image.",
    "- Grad-CAM heatmaps show what drove the score, not where disease is.",
]
_METRICS_NOTE = (
    "Sensitivity, specificity, precision and F1 are for the screening decision (positive "
    "classes vs the rest at the stored threshold); accuracy is multi-class (most probable "
    "class). Covariates-only shows what age and sex alone achieve: the image's added value is "
    "the difference to the combined model."
)


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
    m = dict(manifest)
    positive = " + ".join(m.get("positive_classes", [])) or "positive"
    software = ", ".join(f"{k} {v}" for k, v in software_versions().items())
    lines = [
        f"# Model card: {m.get('name', 'osteoscan model')} {m.get('version', '')}".rstrip(),
        "",
        *_intended_use_and_model(m),
        "",
        "## Training data",
        *_training_data(dict(data_summary or {})),
        "",
        "## Held-out metrics",
        "",
        *_metrics_section(metrics),
        *_added_value(metrics, positive),
        "",
        _METRICS_NOTE,
        *_target_note(m.get("target")),
        "",
        *_speed_section(m.get("extra") or {}),
        "",
        *_LIMITATIONS,
        "",
        "## Reproduction",
        "```",
        command,
        "```",
        f"Software: {software}",
        f"Created: {m.get('created_at', '')}",
        "",
    ]
    return "\n".join(lines)


def _target_note(target: Mapping[str, Any] | None) -> list[str]:
    """What an ordinal or T-score model's numbers mean (nothing for plain classes)."""
    if not target:
        return []
    if target.get("kind") == "ordinal":
        cuts = target.get("grade_cutoffs")
        if not cuts:
            return ["", "Ordinal model (adjacent-category logit head): the classes are ordered "
                    "grades; accuracy, quadratic weighted kappa and mean absolute grade error are "
                    "of the most probable grade."]  # fmt: skip
        shown = ", ".join(f"{float(c):.3f}" for c in cuts)
        return ["", "Ordinal model (adjacent-category logit head): the classes are ordered grades. "
                "The reported grade is read from the expected grade (sum of grade x probability) "
                f"through cut-offs fitted on the validation part ({shown}); accuracy, quadratic "
                "weighted kappa and mean absolute grade error are of that grade, on rows the "
                "cut-offs were not fitted on."]  # fmt: skip
    if target.get("kind") == "tscore":
        scale = target.get("scale")
        values: list[Any] = scale if isinstance(scale, list) else [scale]
        scales = ", ".join(f"{float(x):.3f}" for x in values if x is not None)
        return ["", "T-score model: a regression head predicts the T-score; the WHO category "
                "probabilities (T <= -2.5 osteoporosis, -2.5 < T < -1 osteopenia, T >= -1 normal) "
                "follow from it with an error scale fitted on the validation part "
                f"(scale per member: {scales}). T-score MAE / Pearson r / AUCs of the predicted "
                "T-score are on the held-out part."]  # fmt: skip
    return []


def _speed_section(extra: Mapping[str, Any]) -> list[str]:
    """Measured training speed (images per second per stage) and wall times."""
    t = extra.get("timings") or {}
    rates = [(k[: -len("_img_s")], v) for k, v in t.items() if k.endswith("_img_s") and v]
    if not rates:
        return []
    host = f"{platform.machine()}, {os.cpu_count()} CPU(s)"
    lines = ["## Training speed", f"Measured on this run ({host}; median over epochs):"]
    names = {"read": "reading + preprocessing (files/s)", "val": "validation forward"}
    for stage, v in rates:
        lines.append(f"- {names.get(stage, f'training, stage {stage}')}: {float(v):.1f} images/s")
    walls = [f"{k[:-2]} {float(v) / 60:.1f} min" for k, v in t.items() if k.endswith("_s")
             and not k.endswith("img_s")]  # fmt: skip
    if walls:
        lines.append("- Wall time: " + ", ".join(walls))
    return [*lines, ""]


def _intended_use_and_model(m: Mapping[str, Any]) -> list[str]:
    pos = m.get("positive_classes", [])
    members = m.get("members", [])
    return [
        "> **NOT FOR CLINICAL USE.** Research software. This model has not been validated for",
        "> diagnosis or treatment decisions; a flag is a suggestion to consider DXA, not a",
        "> diagnosis.",
        "",
        "## Intended use",
        f"Batch screening of {', '.join(m.get('body_parts', ['knee']))} radiographs in research "
        f"archives to find images suggestive of {' or '.join(pos) or 'low bone density'}, so that "
        "the patients can be considered for a DXA referral. Classes: "
        f"{', '.join(m.get('classes', []))}. Screening score = probability of {' + '.join(pos)}; "
        f"flagged when score >= {m.get('threshold', 'n/a')} (chosen on validation data for a "
        f"target sensitivity of {m.get('target_sensitivity', 'n/a')}).",
        "",
        "## Model",
        f"- Ensemble of {len(members)} member(s): "
        + ", ".join(
            f"{x.get('arch')}" + (f" (fold {x['fold']})" if x.get("fold") is not None else "")
            for x in members
        ),
        f"- Input: {m.get('preprocess', {})}",
        f"- Covariates used: {', '.join(m.get('covariates', [])) or 'none (image only)'}",
        *(["- Test-time flip: each member's logits are the mean over the image and its mirror "
           "image (validation and held-out metrics were computed the same way)"]
          if any(x.get("test_time_flip") for x in members) else []),
    ]  # fmt: skip


def _training_data(ds: Mapping[str, Any]) -> list[str]:
    src = ds.get("source") or {}
    if src:
        lines = [
            f"- Source: {src.get('name', '')}. {src.get('citation', '')} doi:{src.get('doi', '')}",
            f"- Licence: {src.get('licence', 'unknown')}. Cite the source when using this model.",
        ]
    else:
        lines = [f"- Source: {ds.get('data', 'user-supplied data')} (licence: as supplied)."]
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
    return lines
