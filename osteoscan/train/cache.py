"""Read every training image once, preprocess it, keep the small result (memory and disk).

Training epochs on a CPU should be compute-bound, not decode-bound: each file goes through
:func:`osteoscan.readers.read_frames` → :func:`osteoscan.preprocess.preprocess` exactly once, and
the ``uint16`` model input (a few hundred KB) is kept in memory. With ``cache_dir`` the result is
also stored as ``<file sha256>-<preprocess hash>.npz``, so a second run on the same data with the
same preprocessing skips decoding entirely; any change to the file bytes or to the preprocessing
configuration changes the key, so a stale entry can never be used.

While the full-resolution image is in hand, its de-duplication :class:`Fingerprint` (pixel hash,
perceptual hash, 64×64 thumbnail) is computed too, so duplicate search needs no second read.
Only the first frame of a multi-frame file is used for training. Patient identifiers are never
stored; header age and sex are (they are the model's covariates).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osteoscan.atomic import AtomicFile
from osteoscan.errors import OutputError
from osteoscan.hashing import file_sha256
from osteoscan.preprocess import PreprocessConfig, preprocess
from osteoscan.train.dedup import Fingerprint, fingerprint

__all__ = ["CachedImage", "ImageCache", "file_sha256", "preprocess_key"]

CACHE_FORMAT = 1


@dataclass
class CachedImage:
    """One preprocessed training image (``image`` is None when the file could not be used)."""

    path: str
    status: str = "ok"
    reason: str = ""
    image: np.ndarray | None = None  # uint16 (size, size)
    fingerprint: Fingerprint | None = None
    age: float | None = None
    sex: str | None = None
    body_part: str = "unknown"
    sha256: str = ""
    from_disk: bool = False


def preprocess_key(cfg: PreprocessConfig) -> str:
    """Short stable hash of a preprocessing configuration (part of the disk-cache key)."""
    text = json.dumps({"format": CACHE_FORMAT, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ImageCache:
    """Memory (and optional disk) cache of preprocessed images keyed by path."""

    def __init__(self, cfg: PreprocessConfig, cache_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[str, CachedImage] = {}
        self._pkey = preprocess_key(cfg)

    def _disk_path(self, sha: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{sha[:32]}-{self._pkey}.npz"

    def _load_disk(self, path: str, sha: str) -> CachedImage | None:
        file = self._disk_path(sha)
        if file is None or not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                image = z["image"] if meta.get("has_image") else None
                small = z["small"] if meta.get("pixel_hash") is not None else None
        except (OSError, ValueError, KeyError):
            return None  # a corrupt entry is just a miss; it is rewritten below
        fp = None
        if small is not None:
            fp = Fingerprint(meta["pixel_hash"], int(meta["phash"]), small)
        return CachedImage(
            path=path,
            status=meta["status"],
            reason=meta["reason"],
            image=image,
            fingerprint=fp,
            age=meta["age"],
            sex=meta["sex"],
            body_part=meta["body_part"],
            sha256=sha,
            from_disk=True,
        )

    def _save_disk(self, item: CachedImage) -> None:
        file = self._disk_path(item.sha256)
        if file is None or item.status == "error":
            return  # errors may be transient (missing decoder): never cache them
        file.parent.mkdir(parents=True, exist_ok=True)
        fp = item.fingerprint
        meta = {
            "status": item.status,
            "reason": item.reason,
            "age": item.age,
            "sex": item.sex,
            "body_part": item.body_part,
            "has_image": item.image is not None,
            "pixel_hash": fp.pixel_hash if fp else None,
            "phash": str(fp.phash) if fp else None,
        }
        empty = np.zeros((0,), dtype=np.uint16)
        # Atomic: a killed run never leaves a half-written entry. A cache that cannot be written
        # (disk full) only costs speed, so the error is dropped.
        with contextlib.suppress(OutputError), AtomicFile(file) as f:
            np.savez(
                f.open("wb"),
                image=item.image if item.image is not None else empty,
                small=fp.small if fp else np.zeros((0,), np.float32),
                meta=np.array(json.dumps(meta)),
            )

    def _read(self, path: str) -> CachedImage:
        from osteoscan.readers import read_frames  # lazy: readers pull in pydicom & codecs

        try:
            sha = file_sha256(path)
        except OSError as exc:
            return CachedImage(path=path, status="error", reason=f"cannot read file: {exc}")
        hit = self._load_disk(path, sha)
        if hit is not None:
            return hit
        frames = read_frames(path)
        ok = [f for f in frames if f.status == "ok" and f.image is not None]
        if not ok:
            first = frames[0] if frames else None
            status = first.status if first is not None else "error"
            reason = first.reason if first is not None else "no image frame"
            item = CachedImage(path=path, status=status, reason=reason, sha256=sha)
        else:
            f = ok[0]
            item = CachedImage(
                path=path,
                image=preprocess(f.image, self.cfg),
                fingerprint=fingerprint(f.image),
                age=f.age,
                sex=f.sex,
                body_part=f.body_part,
                sha256=sha,
            )
        self._save_disk(item)
        return item

    def get(self, path: str | Path) -> CachedImage:
        """The cached image for ``path``, reading and preprocessing it on first use."""
        key = str(path)
        if key not in self._mem:
            self._mem[key] = self._read(key)
        return self._mem[key]

    def load_all(
        self,
        paths: Sequence[str | Path],
        workers: int = 2,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[CachedImage]:
        """Read all ``paths`` (threads: decoders release the GIL), in order; ``progress(i, n)``."""
        keys = [str(p) for p in paths]
        todo = [k for k in dict.fromkeys(keys) if k not in self._mem]
        n = len(todo)
        if workers > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i, item in enumerate(pool.map(self._read, todo), 1):
                    self._mem[item.path] = item
                    if progress:
                        progress(i, n)
        else:
            for i, key in enumerate(todo, 1):
                self._mem[key] = self._read(key)
                if progress:
                    progress(i, n)
        return [self._mem[k] for k in keys]
