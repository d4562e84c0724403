"""Labelled training/evaluation data: a folder per class, or a labels CSV.

Two layouts are accepted (``--data DIR|CSV``):

- **Folder per class**: ``DIR/<class>/...`` where ``<class>`` is one of the aliases in
  :data:`CLASS_ALIASES` (``normal``/``healthy``, ``osteopenia``, ``osteoporosis``/``OS``...).
  Files directly inside a class folder have no group; files inside a further sub-folder
  (``DIR/normal/patient42/img.dcm``) get that sub-folder's name as their group, so all images of
  one patient stay on one side of a split. Files at the top of ``DIR`` (README, CSV) are ignored.
- **Labels CSV**: columns ``path,label[,group]``; ``path`` relative to the CSV's folder or absolute.

Images are recognised by content (``osteoscan.discover.sniff``), as ``scan`` does. Classes come
back in the canonical order ``normal, osteopenia, osteoporosis`` (only those present); binary
sets (e.g. normal vs osteoporosis) are fine.
"""

from __future__ import annotations

import csv
import re
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


@dataclass(frozen=True)
class LabelledSample:
    """One labelled image file; ``group`` ties images of one patient (None: its own group)."""

    path: Path
    label: str
    group: str | None = None


def canonical_class(name: str) -> str | None:
    """Map a folder name or CSV label onto a canonical class, or ``None`` when unknown.

    Case, surrounding spaces, ``_``/``-`` separators and a leading ordinal (``0_normal``,
    ``2-Osteoporosis``) are ignored.
    """
    text = str(name).strip().casefold()
    text = re.sub(r"^\d+\s*[._\- ]\s*", "", text)  # "0_normal", "2 - osteoporosis"
    text = re.sub(r"[_\-\s]+", " ", text).strip()
    return _ALIAS_TO_CLASS.get(text)


def aliases_help() -> str:
    """Human-readable list of the accepted class names, for error messages."""
    return "; ".join(f"{cls}: {', '.join(al)}" for cls, al in CLASS_ALIASES.items())


def order_classes(labels: set[str] | list[str]) -> list[str]:
    """The canonical classes present in ``labels``, in canonical order."""
    present = set(labels)
    return [c for c in CANONICAL_CLASSES if c in present]


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
            f"{root}: no class sub-folders found (expected e.g. normal/, osteoporosis/)"
        )
    unknown = [d.name for d in subdirs if canonical_class(d.name) is None]
    if unknown:
        raise UsageError(
            f"{root}: unknown class folder(s) {', '.join(repr(u) for u in unknown)}; "
            f"accepted folder names (any case) are {aliases_help()}"
        )
    samples: list[LabelledSample] = []
    for d in subdirs:
        label = canonical_class(d.name)
        assert label is not None
        for p in _walk_images(d):
            rel = p.relative_to(d)
            group = rel.parts[0] if len(rel.parts) > 1 else None
            samples.append(LabelledSample(path=p, label=label, group=group))
    return samples


def _load_csv(csv_path: Path) -> list[LabelledSample]:
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {(c or "").strip().casefold(): c for c in (reader.fieldnames or [])}
        if "path" not in cols or "label" not in cols:
            raise UsageError(
                f"{csv_path}: a labels CSV needs columns path,label[,group]; "
                f"found {', '.join(reader.fieldnames or []) or 'none'}"
            )
        p_col, l_col, g_col = cols["path"], cols["label"], cols.get("group")
        samples: list[LabelledSample] = []
        missing: list[str] = []
        bad_labels: set[str] = set()
        for row in reader:
            raw = (row.get(p_col) or "").strip()
            if not raw:
                continue
            label = canonical_class(row.get(l_col) or "")
            if label is None:
                bad_labels.add((row.get(l_col) or "").strip())
                continue
            p = Path(raw)
            p = p if p.is_absolute() else csv_path.parent / p
            if not p.is_file():
                missing.append(raw)
                continue
            group = (row.get(g_col) or "").strip() or None if g_col else None
            samples.append(LabelledSample(path=p, label=label, group=group))
    if bad_labels:
        raise UsageError(
            f"{csv_path}: unknown label(s) {', '.join(repr(b) for b in sorted(bad_labels))}; "
            f"accepted labels (any case) are {aliases_help()}"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise UsageError(f"{csv_path}: {len(missing)} listed file(s) not found: {shown}")
    return samples


def load_labelled(data: str | Path) -> tuple[list[LabelledSample], list[str]]:
    """Load labelled images from a folder-per-class tree or a ``path,label[,group]`` CSV.

    Returns ``(samples, classes)``: samples sorted by path, classes in canonical order (only the
    classes present). Raises :class:`UsageError` for a missing path, unknown class names (the
    message lists the accepted aliases), no images, or fewer than two classes.
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
    classes = order_classes({s.label for s in samples})
    if len(classes) < 2:
        raise UsageError(
            f"--data {data}: only class {classes[0]!r} found; training and evaluation need at "
            "least two classes"
        )
    return samples, classes
