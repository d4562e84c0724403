"""Duplicate images in labelled data: find them, group them, drop the contradictory ones.

Three tests, from strict to loose, each giving pairs of sample indices:

1. **bytes**: identical files (sha256 of the bytes).
2. **pixels**: identical decoded pixels (same shape and the same image after quantising the
   reader's float image to 16 bits, so a JPEG re-saved as PNG, or a DICOM re-encoded with another
   transfer syntax, still matches).
3. **near**: perceptual hash (pHash of an 8-bit downscale) within ``max_hamming`` bits, then
   *verified* on aligned 64 x 64 downscales: Pearson correlation >= ``min_corr`` **and** mean
   absolute difference (after per-image percentile normalisation) <= ``max_mae``. Both are
   required: on knee radiographs with large dark backgrounds, different patients reach MAE ~0.03
   and correlation ~0.97, so either criterion alone would merge distinct patients.

Pairs from all tests (plus samples sharing an explicit ``group``, e.g. a patient ID) are joined
with union-find. A duplicate group whose members carry different labels is *conflicting*: all its
members are dropped, since at least one label is wrong and we cannot tell which. Every remaining
sample gets a ``group_of`` id that the splitter keeps on one side of every split.

To keep memory flat on large sets, ``images`` may hold precomputed :class:`Fingerprint` objects
(see :func:`fingerprint`) instead of full images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import imagehash
import numpy as np
from PIL import Image

from osteoscan.constants import U16_MAX
from osteoscan.hashing import file_sha256
from osteoscan.train.data import LabelledSample

HASH_SIDE = 256  # images are downscaled to this long side before perceptual hashing
VERIFY_SIDE = 64  # aligned downscale used to verify perceptual-hash candidates
KINDS: tuple[str, ...] = ("bytes", "pixels", "near")


@dataclass(frozen=True)
class Fingerprint:
    """What dedup needs from one decoded image: exact pixel hash, pHash, and a 64x64 thumbnail."""

    pixel_hash: str
    phash: int
    small: np.ndarray  # float32 (VERIFY_SIDE, VERIFY_SIDE), percentile-normalised to [0, 1]


@dataclass
class DedupResult:
    """Outcome of :func:`find_duplicates`.

    - ``groups``: duplicate groups (sample indices, size >= 2, sorted), conflicting ones included.
    - ``conflicting``: the groups whose members carry different labels (all dropped).
    - ``dropped``: sample indices to exclude from training and evaluation.
    - ``group_of``: one group id per sample; duplicates and samples of one explicit group share it.
    - ``kind_counts``: groups each test finds on its own (``bytes``, ``pixels``, ``near``).
    - ``pairs``: ``(i, j, kind)`` for every matched pair, strictest kind first.
    """

    groups: list[list[int]]
    n_duplicate_groups: int
    n_conflicting_groups: int
    dropped: list[int]
    group_of: list[str]
    conflicting: list[list[int]] = field(default_factory=list)
    kind_counts: dict[str, int] = field(default_factory=dict)
    pairs: list[tuple[int, int, str]] = field(default_factory=list)

    def summary(self, samples: Sequence[LabelledSample] | None = None) -> dict[str, Any]:
        """JSON-able summary for the manifest's ``training_data`` and the model card.

        With ``samples``, conflicting groups are listed by file name (no patient data).
        """
        out: dict[str, Any] = {
            "n_duplicate_groups": self.n_duplicate_groups,
            "n_conflicting_groups": self.n_conflicting_groups,
            "n_dropped": len(self.dropped),
            "n_duplicate_images": sum(len(g) for g in self.groups),
            "duplicate_groups_by_kind": dict(self.kind_counts),
        }
        if samples is not None:
            out["conflicting_groups"] = [
                [f"{samples[i].label}/{samples[i].path.name}" for i in g] for g in self.conflicting
            ]
        return out


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            # The smaller index becomes the root, so group ids are deterministic.
            self.parent[max(a, b)] = min(a, b)

    def components(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def _to_uint8(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        img = cv2.resize(
            img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def pixel_hash(image: np.ndarray) -> str:
    """sha256 of a float image (H, W) in [0, 1] quantised to 16 bits (the ``pixels`` test)."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    # 16-bit quantisation absorbs float rounding (8-bit x/255 vs 16-bit 257x/65535) but keeps
    # every distinction a 16-bit radiograph can carry.
    q = np.round(np.clip(img, 0.0, 1.0) * U16_MAX).astype("<u2")
    return hashlib.sha256(f"{q.shape}".encode() + q.tobytes()).hexdigest()


def fingerprint(image: np.ndarray) -> Fingerprint:
    """Fingerprint one float image (H, W) in [0, 1] (a reader's output) for duplicate search."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {img.shape}")
    digest = pixel_hash(img)
    ph = int(str(imagehash.phash(Image.fromarray(_to_uint8(img, HASH_SIDE)))), 16)
    small = cv2.resize(img, (VERIFY_SIDE, VERIFY_SIDE), interpolation=cv2.INTER_AREA)
    lo, hi = np.percentile(small, [1.0, 99.0])
    small = np.clip((small - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    return Fingerprint(pixel_hash=digest, phash=ph, small=small)


def verify_near(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, mean absolute difference) of two aligned thumbnails."""
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    sx, sy = x.std(), y.std()
    corr = float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)) if sx > 0 and sy > 0 else 0.0
    if sx == 0 and sy == 0:
        corr = 1.0 if np.array_equal(x, y) else 0.0
    return corr, float(np.abs(x - y).mean())


def _lookup(images: Mapping[Any, Any] | None, path: Path) -> Any:
    if images is None:
        return None
    for key in (path, str(path)):
        if key in images:
            return images[key]
    return None


def _exact_pairs(keys: Sequence[str | None]) -> list[tuple[int, int]]:
    first: dict[str, int] = {}
    pairs = []
    for i, k in enumerate(keys):
        if k is None:
            continue
        if k in first:
            pairs.append((first[k], i))
        else:
            first[k] = i
    return pairs


def _near_pairs(
    fps: Sequence[Fingerprint | None], max_hamming: int, min_corr: float, max_mae: float
) -> list[tuple[int, int]]:
    idx = [i for i, f in enumerate(fps) if f is not None]
    if len(idx) < 2:
        return []
    hashes = np.array([fps[i].phash for i in idx], dtype=np.uint64)  # type: ignore[union-attr]
    pairs = []
    # Row by row keeps memory O(n) while numpy does the O(n^2) popcounts.
    for a in range(len(idx) - 1):
        dist = np.bitwise_count(hashes[a] ^ hashes[a + 1 :])
        for off in np.nonzero(dist <= max_hamming)[0]:
            i, j = idx[a], idx[a + 1 + int(off)]
            corr, mae = verify_near(fps[i].small, fps[j].small)  # type: ignore[union-attr]
            if corr >= min_corr and mae <= max_mae:
                pairs.append((i, j))
    return pairs


def _count_groups(n: int, pairs: Sequence[tuple[int, int]]) -> int:
    uf = _UnionFind(n)
    for i, j in pairs:
        uf.union(i, j)
    return sum(1 for members in uf.components().values() if len(members) > 1)


def _file_keys(
    samples: Sequence[LabelledSample], file_hashes: Sequence[str | None] | None
) -> list[str | None]:
    """sha256 of each sample's file, for the first sample of each file only: the frames of one
    multi-frame file are one file, not byte-identical duplicates (their group ties them)."""
    seen: dict[str, str | None] = {}
    keys: list[str | None] = []
    for i, s in enumerate(samples):
        path = str(s.path)
        if path in seen:
            keys.append(None)
            continue
        if file_hashes is not None:
            seen[path] = file_hashes[i]
        else:
            try:
                seen[path] = file_sha256(s.path)
            except OSError:
                seen[path] = None
        keys.append(seen[path])
    return keys


def find_duplicates(
    samples: Sequence[LabelledSample],
    images: Mapping[Any, np.ndarray | Fingerprint | None]
    | Sequence[np.ndarray | Fingerprint | None]
    | None = None,
    *,
    max_hamming: int = 8,
    min_corr: float = 0.98,
    max_mae: float = 0.03,
    check_bytes: bool = True,
    file_hashes: Sequence[str | None] | None = None,
) -> DedupResult:
    """Find byte-identical, pixel-identical and near-duplicate samples; see the module docstring.

    ``images`` maps a sample's path (``Path`` or ``str``) to its decoded float image, or to its
    :class:`Fingerprint`, or is a sequence of those aligned with ``samples`` (one per frame of a
    multi-frame file); samples without one (unreadable files) take part in the byte test only.
    ``file_hashes`` (aligned with ``samples``) saves hashing the files again.
    """
    n = len(samples)
    fps: list[Fingerprint | None] = []
    for i, s in enumerate(samples):
        item = images[i] if isinstance(images, Sequence) else _lookup(images, s.path)
        fps.append(fingerprint(item) if isinstance(item, np.ndarray) else item)

    by_kind: dict[str, list[tuple[int, int]]] = {}
    if check_bytes:
        by_kind["bytes"] = _exact_pairs(_file_keys(samples, file_hashes))
    by_kind["pixels"] = _exact_pairs([f.pixel_hash if f is not None else None for f in fps])
    by_kind["near"] = _near_pairs(fps, max_hamming, min_corr, max_mae)

    dup = _UnionFind(n)
    pairs: list[tuple[int, int, str]] = []
    seen: set[tuple[int, int]] = set()
    for kind in KINDS:
        for i, j in by_kind.get(kind, []):
            dup.union(i, j)
            if (i, j) not in seen:
                seen.add((i, j))
                pairs.append((i, j, kind))
    groups = sorted(m for m in dup.components().values() if len(m) > 1)
    conflicting = [g for g in groups if len({samples[i].label for i in g}) > 1]
    dropped = sorted(i for g in conflicting for i in g)

    # Split groups: duplicate groups joined with explicit groups (e.g. one patient's images).
    full = _UnionFind(n)
    for g in groups:
        for i in g[1:]:
            full.union(g[0], i)
    first_of_group: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.group is not None:
            full.union(first_of_group.setdefault(s.group, i), i)
    group_of = [f"g{full.find(i)}" for i in range(n)]

    return DedupResult(
        groups=groups,
        n_duplicate_groups=len(groups),
        n_conflicting_groups=len(conflicting),
        dropped=dropped,
        group_of=group_of,
        conflicting=conflicting,
        kind_counts={k: _count_groups(n, v) for k, v in by_kind.items()},
        pairs=pairs,
    )


def _default_read(path: Path) -> np.ndarray | None:
    """First usable frame of a file, read under the per-file guards (training reads every frame
    through :mod:`osteoscan.load`; this helper only fingerprints whole files)."""
    from osteoscan.guards import guarded_read

    ok = [f for f in guarded_read(path) if f.status == "ok" and f.image is not None]
    return ok[0].image if ok else None


def fingerprint_files(
    samples: Sequence[LabelledSample],
    read: Callable[[Path], np.ndarray | None] | None = None,
) -> dict[str, Fingerprint | None]:
    """Read each sample once and keep only its :class:`Fingerprint` (flat memory)."""
    read = read or _default_read
    out: dict[str, Fingerprint | None] = {}
    for s in samples:
        img = read(s.path)
        out[str(s.path)] = fingerprint(img) if img is not None else None
    return out
