"""Percentiles of an image with few distinct values from its histogram, as ``np.percentile``.

An 8- or 16-bit raster is read as ``level / max`` floats (:mod:`osteoscan.readers.raster`), so a
512 x 512 sample of it holds at most 256 (or 65536) distinct values. ``np.percentile`` partitions
a copy of all 262,144 values to find two order statistics; counting the integer levels with
``np.bincount`` gives the same order statistics in one pass, and the gate's other statistics
(grey levels, white fraction) come from the same counts (:mod:`osteoscan.gate`).

:func:`integer_levels` recovers the levels and *checks* that they reproduce the image exactly
(otherwise None: the caller keeps its float path), so nothing depends on a reader's promise.
:func:`percentiles_from_counts` interpolates between neighbouring order statistics with numpy's
``"linear"`` method, operation for operation; it agrees with ``np.percentile`` on the expanded
values to a relative 1e-13 (float64 rounding, far below the float32 resolution of the images;
``tests/test_quantiles.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["integer_levels", "level_values", "percentiles_from_counts"]


@functools.cache
def level_values(top: int) -> np.ndarray:
    """float32 value of every level ``0..top``: ``level / top`` rounded once, as the raster
    reader maps 8-bit (``top`` 255) and 16-bit (65535) pixels. Cached: do not modify."""
    return (np.arange(top + 1, dtype=np.float64) / float(top)).astype(np.float32)


def integer_levels(image: np.ndarray, top: int) -> np.ndarray | None:
    """The integer levels (``uint16``) of a float32 ``image`` whose every value is
    ``level_values(top)[level]``; None when ``top`` is not 255/65535 or any value is not such."""
    if top not in (255, 65535) or image.dtype != np.float32:
        return None
    table = level_values(top)
    scaled = image * np.float32(top)
    np.rint(scaled, out=scaled)
    # NaN, inf and values outside [0, 1] fail the round trip below (after a safe cast).
    np.clip(scaled, 0, top, out=scaled)
    levels = scaled.astype(np.uint16)
    if not np.array_equal(table[levels], image):
        return None
    return levels


def percentiles_from_counts(
    values: np.ndarray, counts: np.ndarray, q: Sequence[float]
) -> np.ndarray:
    """``np.percentile(np.repeat(values, counts), q)`` (method ``"linear"``) as float64, without
    expanding: ``values`` sorted ascending, ``counts`` their (positive) multiplicities."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    quantiles = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    # numpy's "linear" method: virtual index, its floor and the next index, gamma.
    virtual = n * quantiles + (1 + quantiles * (1 - 1 - 1)) - 1
    previous_idx = np.clip(np.floor(virtual).astype(np.intp), 0, n - 1)
    next_idx = np.clip(previous_idx + 1, 0, n - 1)
    previous = values[np.searchsorted(cum, previous_idx, side="right")]
    following = values[np.searchsorted(cum, next_idx, side="right")]
    gamma = virtual - np.floor(virtual)
    diff = following - previous
    out = np.add(previous, diff * gamma)
    np.subtract(following, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return np.asarray(out, dtype=np.float64)
