"""Read every training file once through the load stage, keep the small result (memory and disk).

Training reads exactly what ``scan`` reads: each file goes through :mod:`osteoscan.load` (guarded
read, routing by body part, preprocessing), so a file ``scan`` would skip (a chest DICOM) or refuse
(a decompression bomb) is skipped or an error here too, and a multi-frame file gives one record per
frame. The ``uint16`` model input of every usable frame (a few hundred KB) is kept in memory.
With ``cache_dir`` the result is also stored as ``<file sha256>-<key>.npz``, where the key hashes
the preprocessing and routing configuration, so a second run on the same data skips decoding
entirely; a change to the file bytes, the preprocessing or the routing changes the key, so a stale
entry can never be used.

While the frame as read is in hand, its de-duplication :class:`Fingerprint` (pixel hash,
perceptual hash, 64×64 thumbnail) is computed too, so duplicate search needs no second read.
Patient identifiers are never stored; header age and sex are (they are the model's covariates).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.atomic import AtomicFile
from osteoscan.errors import OutputError
from osteoscan.frames import Status
from osteoscan.hashing import file_sha256
from osteoscan.load import LoadedFrame, single_model_loader
from osteoscan.preprocess import PreprocessConfig
from osteoscan.train.dedup import Fingerprint, fingerprint

__all__ = ["CachedImage", "ImageCache", "file_sha256", "preprocess_key"]

CACHE_FORMAT = 2  # 2: one entry per file holding every frame's record


@dataclass
class CachedImage:
    """One frame of a training file after the load stage; ``image`` is None unless usable."""

    path: str
    frame: int = 0
    status: Status = "ok"
    reason: str = ""
    image: np.ndarray | None = None  # uint16 (size, size) model input
    fingerprint: Fingerprint | None = None
    age: float | None = None
    sex: str | None = None
    body_part: str = "unknown"
    sha256: str = ""
    from_disk: bool = False

    @property
    def usable(self) -> bool:
        """True when this frame can be trained on (the load stage made a model input)."""
        return self.status == "ok" and self.image is not None


def preprocess_key(
    cfg: PreprocessConfig, body_parts: Sequence[str] = ("knee",), body_part: str | None = None
) -> str:
    """Short stable hash of the preprocessing and routing configuration (the disk-cache key)."""
    routing = {"body_parts": list(body_parts), "body_part": body_part or "auto"}
    text = json.dumps({"format": CACHE_FORMAT, **cfg.to_dict(), **routing}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _from_loaded(rec: LoadedFrame, sha: str) -> CachedImage:
    usable = rec.scorable and rec.image is not None
    return CachedImage(
        path=rec.path, frame=rec.frame, status=rec.status, reason=rec.reason,
        image=rec.pixels if usable else None,
        fingerprint=fingerprint(rec.image) if usable and rec.image is not None else None,
        age=rec.age, sex=rec.sex, body_part=rec.body_part, sha256=sha,
    )  # fmt: skip


class ImageCache:
    """Memory (and optional disk) cache of every file's frame records, keyed by path.

    ``body_parts`` are the parts the model will serve and ``body_part`` the ``--body-part`` value
    for files that state none (``None``: the single part served), exactly as in a scan.
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        cache_dir: str | Path | None = None,
        *,
        body_parts: Sequence[str] = ("knee",),
        body_part: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[str, list[CachedImage]] = {}
        self._key = preprocess_key(cfg, body_parts, body_part)
        self._load = single_model_loader(cfg, body_parts, body_part=body_part, keep_image=True)

    def _disk_path(self, sha: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{sha[:32]}-{self._key}.npz"

    def _load_disk(self, path: str, sha: str) -> list[CachedImage] | None:
        file = self._disk_path(sha)
        if file is None or not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as z:
                metas = json.loads(str(z["meta"]))
                images, smalls = z["images"], z["smalls"]
        except (OSError, ValueError, KeyError):
            return None  # a corrupt or old-format entry is just a miss; it is rewritten
        out = []
        for m in metas:
            slot, pixel_hash, phash = m.pop("slot"), m.pop("pixel_hash"), m.pop("phash")
            fp = Fingerprint(pixel_hash, int(phash), smalls[slot]) if slot >= 0 else None
            image = images[slot] if slot >= 0 else None
            item = CachedImage(path=path, image=image, fingerprint=fp, sha256=sha, **m)
            item.from_disk = True
            out.append(item)
        return out

    def _save_disk(self, sha: str, items: list[CachedImage]) -> None:
        file = self._disk_path(sha)
        if file is None or any(it.status == "error" for it in items):
            return  # errors may be transient (missing decoder): never cache them
        file.parent.mkdir(parents=True, exist_ok=True)
        metas: list[dict[str, Any]] = []
        images: list[np.ndarray] = []
        smalls: list[np.ndarray] = []
        for it in items:
            fp = it.fingerprint
            slot = len(images) if it.image is not None and fp is not None else -1
            if slot >= 0 and fp is not None and it.image is not None:
                images.append(it.image)
                smalls.append(fp.small)
            metas.append({
                "frame": it.frame, "status": it.status, "reason": it.reason, "age": it.age,
                "sex": it.sex, "body_part": it.body_part, "slot": slot,
                "pixel_hash": fp.pixel_hash if fp else None, "phash": str(fp.phash) if fp else None,
            })  # fmt: skip
        # Atomic: a killed run never leaves a half-written entry. A cache that cannot be written
        # (disk full) only costs speed, so the error is dropped.
        with contextlib.suppress(OutputError), AtomicFile(file) as f:
            np.savez(
                f.open("wb"),
                images=np.stack(images) if images else np.zeros((0, 1, 1), np.uint16),
                smalls=np.stack(smalls) if smalls else np.zeros((0, 1, 1), np.float32),
                meta=np.array(json.dumps(metas)),
            )

    def _read(self, path: str) -> list[CachedImage]:
        try:
            sha = file_sha256(path)
        except OSError as exc:
            return [CachedImage(path=path, status="error", reason=f"cannot read file: {exc}")]
        hit = self._load_disk(path, sha)
        if hit is not None:
            return hit
        items = [_from_loaded(rec, sha) for rec in self._load(path)]
        self._save_disk(sha, items)
        return items

    def get(self, path: str | Path) -> list[CachedImage]:
        """The frame records of ``path``, reading and preprocessing it on first use."""
        key = str(path)
        if key not in self._mem:
            self._mem[key] = self._read(key)
        return self._mem[key]

    def load_all(
        self,
        paths: Sequence[str | Path],
        workers: int = 2,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[list[CachedImage]]:
        """Frame records of all ``paths`` (threads: decoders release the GIL), in order;
        ``progress(i, n)`` after each file."""
        keys = [str(p) for p in paths]
        todo = [k for k in dict.fromkeys(keys) if k not in self._mem]
        n = len(todo)
        if workers > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i, (key, items) in enumerate(
                    zip(todo, pool.map(self._read, todo), strict=True), 1
                ):
                    self._mem[key] = items
                    if progress:
                        progress(i, n)
        else:
            for i, key in enumerate(todo, 1):
                self._mem[key] = self._read(key)
                if progress:
                    progress(i, n)
        return [self._mem[k] for k in keys]
