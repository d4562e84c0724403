"""Percentiles from integer-level counts: numpy's numbers without partitioning the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from osteoscan.quantiles import integer_levels, level_values, percentiles_from_counts
from osteoscan.readers.raster import _to_float

QS = ([1, 99], [0.5, 99.5], [5], [0, 100], [50, 25.3])


@pytest.mark.parametrize("top", [255, 65535])
def test_levels_round_trip_exactly_for_every_level(top: int) -> None:
    table = level_values(top)
    # the raster reader's mapping: level / top in float64, rounded once to float32
    np.testing.assert_array_equal(table, (np.arange(top + 1) / float(top)).astype(np.float32))
    levels = integer_levels(table.reshape(1, -1), top)
    assert levels is not None
    np.testing.assert_array_equal(levels.ravel(), np.arange(top + 1))
    # the reader divides in float32: the same number for every level
    dtype = np.uint8 if top == 255 else np.uint16
    info: dict[str, object] = {}
    np.testing.assert_array_equal(_to_float(np.arange(top + 1, dtype=dtype)[None], info)[0], table)
    assert info["range"] == f"0..{top}"


def test_levels_refuse_what_is_not_on_the_grid() -> None:
    img = level_values(255)[np.random.default_rng(0).integers(0, 256, (64, 64))]
    assert integer_levels(img, 255) is not None
    assert integer_levels(img, 65535) is not None  # k / 255 == 257 k / 65535: on that grid too
    assert integer_levels(img, 100) is None
    assert integer_levels(img.astype(np.float64), 255) is None
    for bad in (np.nan, np.inf, -0.5, 1.5, 0.5):  # 0.5 lies between two 8-bit levels
        off = img.copy()
        off[7, 9] = bad
        assert integer_levels(off, 255) is None


@pytest.mark.parametrize("seed", range(3))
def test_percentiles_from_counts_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for top in (255, 65535):
        for n in (1, 2, 999, 262_144):
            levels = rng.integers(0, top + 1, n)
            if seed == 2:
                levels = np.minimum(levels, rng.integers(0, 5, n))  # many ties, few levels
            pixels = level_values(top)[levels]
            counts = np.bincount(levels, minlength=top + 1)
            present = np.flatnonzero(counts)
            for q in QS:
                got = percentiles_from_counts(level_values(top)[present], counts[present], q)
                assert got.dtype == np.float64 and got.shape == (len(q),)
                np.testing.assert_allclose(got, np.percentile(pixels, q), rtol=1e-13, atol=0)
