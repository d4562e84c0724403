"""Tests for osteoscan.train.cache: read (load stage) + preprocess once, memory and disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from osteoscan.preprocess import PreprocessConfig, preprocess
from osteoscan.testing.synthetic import synthetic_knee, write_png
from osteoscan.train.cache import ImageCache, preprocess_key


def test_cache_reads_once_and_round_trips_disk(tmp_path: Path) -> None:
    paths = [write_png(tmp_path / f"k{i}.png", synthetic_knee(80, seed=i)) for i in range(3)]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cfg = PreprocessConfig(size=32)
    cache = ImageCache(cfg, tmp_path / "cache")
    calls: list[tuple[int, int]] = []
    files = cache.load_all(
        [*paths, tmp_path / "broken.png"], workers=2, progress=lambda i, n: calls.append((i, n))
    )
    assert calls[-1] == (4, 4)
    assert [len(f) for f in files] == [1, 1, 1, 1]
    items = [f[0] for f in files]
    assert [it.status for it in items] == ["ok", "ok", "ok", "error"]
    assert items[3].image is None and items[3].reason and not items[3].usable
    assert items[0].image.dtype == np.uint16 and items[0].image.shape == (32, 32)
    # Same bits as the shared preprocessing function (what scan will see).
    ref = preprocess(np.round(synthetic_knee(80, seed=0) * 65535) / 65535, cfg)
    assert np.abs(items[0].image.astype(int) - ref.astype(int)).max() <= 1
    assert cache.get(paths[0])[0] is items[0]  # memory hit
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # errors are not cached

    again = [f[0] for f in ImageCache(cfg, tmp_path / "cache").load_all(paths, workers=1)]
    assert all(it.from_disk for it in again)
    for a, b in zip(items, again, strict=False):
        assert np.array_equal(a.image, b.image)
        assert a.fingerprint.pixel_hash == b.fingerprint.pixel_hash
        assert a.fingerprint.phash == b.fingerprint.phash
        assert np.array_equal(a.fingerprint.small, b.fingerprint.small)

    # Another preprocessing config or routing is another key: never a stale hit.
    other = ImageCache(PreprocessConfig(size=48), tmp_path / "cache").load_all(paths[:1])
    assert not other[0][0].from_disk and other[0][0].image.shape == (48, 48)
    assert preprocess_key(cfg) != preprocess_key(PreprocessConfig(size=48))
    assert preprocess_key(cfg) != preprocess_key(cfg, ("spine",))
