"""Labelled training/evaluation data: a folder per class, or a labels CSV.

Two layouts are accepted (``--data DIR|CSV``):

- **Folder per class**: ``DIR/<class>/...``; any folder name is a class. Files directly inside a
  class folder have no group; files inside a further sub-folder (``DIR/normal/patient42/img.dcm``)
  get that sub-folder's name as their group, so all images of one patient stay on one side of a
  split. Files at the top of ``DIR`` (README, CSV) are ignored.
- **Labels CSV**: columns ``path,label[,group]``; ``path`` relative to the CSV's folder or absolute.
  With a ``tscore`` column instead of ``label`` (``path,tscore[,group]``) every image carries its
  T-score and its label is the WHO category of it (:func:`who_category`).

Class names: the osteoporosis aliases of :data:`CLASS_ALIASES` (``healthy``, ``osteoporotic``,
``0_normal``...) normalise to ``normal``/``osteopenia``/``osteoporosis``; any other name is a class
of its own (``0``...``4``, ``fracture``/``no_fracture``). Classes come back in the canonical order
when they are all osteoporosis classes, in numeric order when all are integers (KL grades), else
alphabetically; ``classes=`` fixes the order. Images are recognised by content
(``osteoscan.discover.sniff``), as ``scan`` does.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from osteoscan.errors import UsageError

CANONICAL_CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")

CLASS_ALIASES: dict[str, tuple[str, ...]] = {
    "normal": ("normal", "healthy", "control", "controls", "negative", "norm", "n"),
    "osteopenia": ("osteopenia", "osteopenic", "low bone mass", "low bone density"),
    "osteoporosis": ("osteoporosis", "osteoporotic", "os", "porosis", "osteo porosis"),
}

_ALIAS_TO_CLASS: dict[str, str] = {
    alias: cls for cls, aliases in CLASS_ALIASES.items() for alias in aliases
}

# WHO T-score categories: T <= -2.5 osteoporosis, -2.5 < T < -1 osteopenia, T >= -1 normal.
WHO_OSTEOPOROSIS = -2.5
WHO_NORMAL = -1.0


@dataclass(frozen=True)
class LabelledSample:
    """One labelled image file; ``group`` ties images of one patient (None: its own group)."""

    path: Path
    label: str
    group: str | None = None
    value: float | None = None  # the T-score of a ``path,tscore`` CSV


def canonical_class(name: str) -> str | None:
    """Map a folder name or CSV label onto a canonical class, or ``None`` when unknown.

    Case, surrounding spaces, ``_``/``-`` separators and a leading ordinal (``0_normal``,
    ``2-Osteoporosis``) are ignored.
    """
    text = str(name).strip().casefold()
    text = re.sub(r"^\d+\s*[._\- ]\s*", "", text)  # "0_normal", "2 - osteoporosis"
    text = re.sub(r"[_\-\s]+", " ", text).strip()
    return _ALIAS_TO_CLASS.get(text)


def class_name(name: str) -> str:
    """The class a folder name or CSV label stands for: its canonical osteoporosis class when it
    is an alias (:func:`canonical_class`), else the name itself without surrounding spaces."""
    return canonical_class(name) or str(name).strip()


def who_category(tscore: float) -> str:
    """WHO category of a T-score: ``osteoporosis`` (<= -2.5), ``osteopenia`` or ``normal``
    (>= -1)."""
    if tscore <= WHO_OSTEOPOROSIS:
        return "osteoporosis"
    return "normal" if tscore >= WHO_NORMAL else "osteopenia"


def is_osteoporosis_set(classes: Sequence[str]) -> bool:
    """True when every class is one of the canonical osteoporosis classes."""
    return all(c in CANONICAL_CLASSES for c in classes)


def resolve_positive(classes: Sequence[str], positive: Sequence[str]) -> tuple[str, ...]:
    """The screening-positive classes: ``positive`` (names normalised like labels) or, when
    none are given and the classes are the osteoporosis set, ``osteoporosis``.

    Raises :class:`UsageError` when a named class is not a class of the data, or when none is
    named and the classes are not the osteoporosis set (nobody can guess which are positive).
    """
    if not positive:
        if is_osteoporosis_set(classes) and "osteoporosis" in classes:
            return ("osteoporosis",)
        raise UsageError(
            f"--positive is required: the classes {', '.join(classes)} are not the osteoporosis "
            "classes, so name the screening-positive ones (comma-separated, e.g. --positive "
            f"{','.join(classes[len(classes) // 2 :])}). If they were meant to be osteoporosis "
            f"classes, the accepted names (any case) are {aliases_help()}"
        )
    names = tuple(dict.fromkeys(class_name(p) for p in positive))
    bad = [p for p in names if p not in classes]
    if bad:
        raise UsageError(f"--positive {','.join(bad)} not among the classes {list(classes)}")
    if len(names) == len(classes):
        raise UsageError("--positive names every class: at least one class must be negative")
    return names


def aliases_help() -> str:
    """Human-readable list of the accepted class names, for error messages."""
    return "; ".join(f"{cls}: {', '.join(al)}" for cls, al in CLASS_ALIASES.items())


def order_classes(labels: set[str] | list[str]) -> list[str]:
    """The classes in ``labels``: canonical order for osteoporosis classes, numeric order when
    all are integers (grades), else alphabetical (case-insensitive)."""
    present = set(labels)
    if is_osteoporosis_set(list(present)):
        return [c for c in CANONICAL_CLASSES if c in present]
    if all(re.fullmatch(r"[+-]?\d+", c) for c in present):
        return sorted(present, key=int)
    return sorted(present, key=lambda c: (c.casefold(), c))


def _is_image(path: Path) -> bool:
    from osteoscan.discover import sniff  # content, not the extension, says what a file is

    kind, _ = sniff(path)
    # "broken" files (claimed image, bad content) are kept: the reader turns them into errors
    # that the caller reports, instead of silently shrinking the data set.
    return kind in ("dicom", "png", "jpeg", "tiff", "broken")


def _walk_images(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.name.upper() != "DICOMDIR" and _is_image(p):
            out.append(p)
    return out


def _load_folders(root: Path) -> list[LabelledSample]:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise UsageError(
            f"{root}: no class sub-folders found (expected one per class, e.g. normal/, "
            "osteoporosis/ or 0/ ... 4/)"
        )
    samples: list[LabelledSample] = []
    for d in subdirs:
        label = class_name(d.name)
        for p in _walk_images(d):
            rel = p.relative_to(d)
            group = rel.parts[0] if len(rel.parts) > 1 else None
            samples.append(LabelledSample(path=p, label=label, group=group))
    return samples


def _load_csv(csv_path: Path) -> list[LabelledSample]:
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {(c or "").strip().casefold(): c for c in (reader.fieldnames or [])}
        if "path" not in cols or not ("label" in cols or "tscore" in cols):
            raise UsageError(
                f"{csv_path}: a labels CSV needs columns path,label[,group] or "
                f"path,tscore[,group]; found {', '.join(reader.fieldnames or []) or 'none'}"
            )
        p_col, g_col = cols["path"], cols.get("group")
        t_col = cols.get("tscore")
        l_col = cols.get("label") if t_col is None else None
        samples: list[LabelledSample] = []
        missing: list[str] = []
        bad: list[str] = []
        for n, row in enumerate(reader, 2):
            raw = (row.get(p_col) or "").strip()
            if not raw:
                continue
            value = None
            if t_col is not None:
                value = _tscore(row.get(t_col))
                if value is None:
                    bad.append(f"line {n}: T-score {row.get(t_col)!r}")
                    continue
                label = who_category(value)
            else:
                label = class_name(row.get(l_col or "") or "")
                if not label:
                    bad.append(f"line {n}: empty label")
                    continue
            # Relative paths are relative to the CSV's folder, wherever the command runs.
            p = Path(raw)
            p = p if p.is_absolute() else csv_path.parent / p
            if not p.is_file():
                missing.append(raw)
                continue
            group = (row.get(g_col) or "").strip() or None if g_col else None
            samples.append(LabelledSample(path=p, label=label, group=group, value=value))
    if bad:
        shown = "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(f"{csv_path}: {len(bad)} row(s) without a usable label: {shown}")
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise UsageError(f"{csv_path}: {len(missing)} listed file(s) not found: {shown}")
    return samples


def _tscore(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _fixed_order(data: Path, labels: set[str], classes: Sequence[str]) -> list[str]:
    """``classes`` (``--classes``, names normalised like labels), checked against ``labels``."""
    order = list(dict.fromkeys(class_name(c) for c in classes))
    extra = sorted(labels - set(order))
    if extra:
        raise UsageError(
            f"--data {data}: label(s) {', '.join(repr(e) for e in extra)} are not in --classes "
            f"{','.join(order)}"
        )
    return order


def load_labelled(
    data: str | Path, classes: Sequence[str] | None = None, *, target: str = "class"
) -> tuple[list[LabelledSample], list[str]]:
    """Load labelled images from a folder-per-class tree or a ``path,label[,group]`` CSV.

    Returns ``(samples, classes)``: samples sorted by path, classes in the module's order (or
    ``classes``, when given: every label must be one of them). ``target="tscore"`` needs a
    ``path,tscore[,group]`` CSV; its classes are always the three WHO categories. Raises
    :class:`UsageError` for a missing path, unusable rows, no images, or fewer than two classes.
    """
    data = Path(data)
    if not data.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    if data.is_dir():
        samples = _load_folders(data)
    elif data.suffix.casefold() in (".csv", ".tsv", ".txt"):
        samples = _load_csv(data)
    else:
        raise UsageError(f"--data {data}: expected a folder of class sub-folders or a labels CSV")
    if not samples:
        raise UsageError(f"--data {data}: no images found")
    samples.sort(key=lambda s: str(s.path))
    has_t = all(s.value is not None for s in samples)
    if target == "tscore":
        if not has_t:
            raise UsageError(f"--data {data}: --target tscore needs a path,tscore[,group] CSV")
        return samples, list(CANONICAL_CLASSES)
    labels = {s.label for s in samples}
    order = order_classes(labels) if classes is None else _fixed_order(data, labels, classes)
    if len(labels) < 2:
        raise UsageError(
            f"--data {data}: only class {next(iter(labels))!r} found; training and evaluation "
            "need at least two classes"
        )
    return samples, order
