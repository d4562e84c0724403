"""The training set: labelled files → the usable frames that are trained on, and what was not.

Every file goes through the load stage (:class:`~osteoscan.train.cache.ImageCache`), so a file is
used exactly as ``scan`` would use it: a chest DICOM is ``skipped``, a decompression bomb is an
``error``, a multi-frame file gives every usable frame. The frames of one file share a split group
(with the file's patient group, if any), so a file's frames never straddle a split.

:func:`refuse_unusable` stops a run that cannot give an honest model: a class with fewer usable
independent images than the split needs, or a share of unreadable files above a small limit
(``--allow-unreadable`` accepts the share), each a :class:`~osteoscan.errors.UsageError` (exit 2)
listing the files and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from osteoscan.errors import UsageError
from osteoscan.train.cache import CachedImage
from osteoscan.train.data import LabelledSample

MAX_LISTED = 20  # files named in a refusal; the rest are counted


@dataclass
class TrainingSet:
    """Labelled files, every frame record of each, and the usable frames as training samples.

    ``samples[i]``/``items[i]``/``file_of[i]``: one usable frame, its record and its file's index.
    """

    files: list[LabelledSample]
    records: list[list[CachedImage]]
    samples: list[LabelledSample] = field(default_factory=list)
    items: list[CachedImage] = field(default_factory=list)
    file_of: list[int] = field(default_factory=list)

    def not_used(self, status: str) -> list[tuple[str, str]]:
        """(path, reason) of files with no usable frame whose records include ``status``
        (``error`` files are unreadable; ``skipped`` files are not what the model serves)."""
        out = []
        for f, recs in zip(self.files, self.records, strict=True):
            if any(r.usable for r in recs):
                continue
            errors = [r for r in recs if r.status == "error"]
            if (status == "error") == bool(errors):
                out.append((str(f.path), (errors or recs)[0].reason))
        return out

    def frame_names(self) -> list[str]:
        """One name per sample: its path, with ``#<frame>`` for frames of multi-frame files."""
        multi = {i for i, n in Counter(self.file_of).items() if n > 1}
        return [
            f"{s.path}#{it.frame}" if k in multi else str(s.path)
            for s, it, k in zip(self.samples, self.items, self.file_of, strict=True)
        ]

    def line(self) -> str:
        """The log line: ``read 12/15 images usable (2 unreadable, 1 skipped)``."""
        n_ok = len(set(self.file_of))
        frames = f", {len(self.samples)} frames" if len(self.samples) != n_ok else ""
        return (
            f"read {n_ok}/{len(self.files)} images usable{frames} "
            f"({len(self.not_used('error'))} unreadable, {len(self.not_used('skipped'))} skipped)"
        )


def build_training_set(
    files: Sequence[LabelledSample], records: Sequence[list[CachedImage]]
) -> TrainingSet:
    """Usable frames of ``files`` (``records[i]``: every frame record of file ``i``)."""
    ts = TrainingSet(list(files), list(records))
    for k, (f, recs) in enumerate(zip(files, records, strict=True)):
        ok = [r for r in recs if r.usable]
        # Frames of one file are one group: never on both sides of a split.
        group = f.group if len(ok) < 2 else (f.group or f"file:{f.path}")
        for r in ok:
            ts.samples.append(LabelledSample(f.path, f.label, group, f.value))
            ts.items.append(r)
            ts.file_of.append(k)
    return ts


def _listed(items: list[tuple[str, str]]) -> str:
    lines = [f"  {path}: {reason}" for path, reason in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    return "\n".join(lines)


def refuse_unusable(
    ts: TrainingSet,
    classes: Sequence[str],
    groups: Sequence[str | None],
    need: int,
    *,
    max_unreadable: float = 0.05,
    allow_unreadable: bool = False,
) -> None:
    """Raise :class:`UsageError` when the usable data cannot give an honest model.

    ``groups[i]`` is the split group of sample ``i`` (duplicates and patients share one; ``None``
    for a sample left out, e.g. a conflicting duplicate); a class
    needs ``need`` independent usable images. Unreadable files above ``max_unreadable`` of all
    files are refused unless ``allow_unreadable``.
    """
    bad = ts.not_used("error")
    share = len(bad) / max(1, len(ts.files))
    if bad and share > max_unreadable and not allow_unreadable:
        raise UsageError(
            f"{len(bad)} of {len(ts.files)} files ({share:.0%}) cannot be read, above the limit "
            f"of {max_unreadable:.0%}; fix or remove them, or train anyway with "
            f"--allow-unreadable:\n{_listed(bad)}"
        )
    short = []
    for c in classes:
        have = len({g for s, g in zip(ts.samples, groups, strict=True) if s.label == c and g})
        if have < need:
            short.append(f"{c} has {have}")
    if short:
        lost = bad + ts.not_used("skipped")
        detail = f"; files not used:\n{_listed(lost)}" if lost else ""
        raise UsageError(
            f"too few usable images for this split: {', '.join(short)} independent usable "
            f"image(s), the split needs {need} per class; add data or use fewer --folds{detail}"
        )
