"""Knee-joint region of interest on AP knee radiographs, found without training.

The published knee-osteoporosis models gained most from looking at the joint region only, where
the trabecular bone of the femoral condyles and the tibial plateau is. Radiographs in the wild show
one knee or both, with anything from a tight joint view to the whole lower leg, so a fixed centre
crop misses the joint on many films. :func:`detect_knee_joint` finds it with intensity profiles,
deterministically and in a few milliseconds:

1. **Legs** — on a 512-pixel working copy, the body (soft tissue + bone) is separated from the
   dark background with Otsu's threshold; the column profile of the body fraction has one run per
   leg. Two wide runs mean a bilateral film; a single very wide run is split at its darkest column
   when the two legs touch.
2. **Bone columns** — inside each leg, the brightest contiguous band of the column-intensity
   profile is the femur/tibia column.
3. **Joint line** — along the bone columns, the joint space is a dark horizontal band between the
   bright condyles and the bright tibial plateau: per column, a "valley" score (mean of the rows
   above and below minus the row itself, at the scale of the gap) is averaged across the bone
   columns, weighted by how strongly the image edges are horizontal there (shafts give vertical
   edges), and the best row wins.
4. **Box** — a square centred on the joint line and the bone column, its side a fixed multiple of
   the bone width. For a bilateral film, the box covers both joints (the union of the per-knee
   boxes), so the model sees both knees.

It never raises for an image: anything implausible (no body, no bone column, no joint valley)
falls back to a centre crop and says why in :attr:`KneeROI.reason`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["KneeROI", "detect_knee_joint", "crop_knee_joint", "BOX_SCALE"]

WORK_SIDE = 512  # long side of the working copy; the joint gap is still several pixels wide
BOX_SCALE = 1.25  # box side = BOX_SCALE x bone width at the joint line (condyles + margin)
CENTRE_FRACTION = 0.7  # centre-crop fallback covers this fraction of each side

Box = tuple[int, int, int, int]  # (top, left, bottom, right), half-open, input-pixel coordinates


@dataclass(frozen=True)
class KneeROI:
    """Where the knee joint(s) are on an image.

    - ``box``: the crop to use, ``(top, left, bottom, right)`` half-open, in the coordinates of
      the image given to :func:`detect_knee_joint`; covers both joints on a bilateral film.
    - ``knees``: one box per detected knee (empty for a fallback).
    - ``joint_rows``: the joint-line row of each knee (input coordinates).
    - ``method``: ``"detected"`` or ``"fallback"`` (centre crop); ``reason`` says why.
    """

    box: Box
    knees: tuple[Box, ...]
    joint_rows: tuple[int, ...]
    method: str
    reason: str = ""


def _smooth1d(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x.astype(np.float32)
    col = np.asarray(x, np.float32).reshape(-1, 1)
    return cv2.GaussianBlur(col, (1, 0), sigmaX=0.0, sigmaY=float(sigma)).ravel()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges where a 1-D boolean mask is True."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _otsu(img: np.ndarray) -> float:
    u8 = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _legs(img: np.ndarray) -> list[tuple[int, int]]:
    """Column ranges of the legs (1 or 2), widest first is not implied: sorted left to right."""
    h, w = img.shape
    # Half of Otsu's threshold: Otsu alone often splits bone from soft tissue, not body from air.
    body = img > 0.5 * _otsu(img)
    frac = _smooth1d(body.mean(axis=0), w / 200)
    runs = [r for r in _runs(frac > 0.5 * float(frac.max())) if r[1] - r[0] >= 0.05 * w]
    if not runs:
        return []
    runs = sorted(sorted(runs, key=lambda r: r[1] - r[0], reverse=True)[:2])
    if len(runs) == 1 and runs[0][1] - runs[0][0] > 0.6 * w:
        # Two legs touching (or a very wide single knee): split at a clear central dip in the
        # column intensity, if there is one.
        a, b = runs[0]
        prof = _smooth1d(img.mean(axis=0), w / 100)
        lo, hi = a + (b - a) // 4, b - (b - a) // 4
        cut = lo + int(np.argmin(prof[lo:hi]))
        side = min(float(prof[a:cut].max()), float(prof[cut:b].max()))
        if prof[cut] < 0.75 * side:
            runs = [(a, cut), (cut, b)]
    return runs


def _merge_close(runs: list[tuple[int, int]], gap: float) -> list[tuple[int, int]]:
    """Join runs separated by fewer than ``gap`` samples (the two cortices of one shaft)."""
    out: list[tuple[int, int]] = []
    for r in runs:
        if out and r[0] - out[-1][1] < gap:
            out[-1] = (out[-1][0], r[1])
        else:
            out.append(r)
    return out


def _bone_columns(img: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """The bright bone band inside the leg columns [a, b)."""
    prof = _smooth1d(img[:, a:b].mean(axis=0), (b - a) / 30)
    lo, hi = float(np.percentile(prof, 5)), float(prof.max())
    # A bright cortex can outshine the marrow between the two cortices: merge nearby runs.
    runs = _merge_close(_runs(prof > lo + 0.5 * (hi - lo)), float(b - a))
    best = max(runs, key=lambda r: float(prof[r[0] : r[1]].sum()))
    return a + best[0], a + best[1]


def _joint_extent(img: np.ndarray, y: int, a: int, b: int, c0: int, c1: int) -> tuple[int, int]:
    """Columns of the condyles/plateau around joint row ``y`` inside leg columns [a, b).

    The bone is widest at the joint, so the shaft band [c0, c1) underestimates it: measure the
    bright run through the bone column on the rows just above and below the gap instead.
    """
    h = img.shape[0]
    k = max(2, round(0.03 * h))
    rows = np.r_[max(0, y - 2 * k) : max(1, y - k // 2), min(h - 1, y + k // 2) : min(h, y + 2 * k)]
    prof = _smooth1d(img[rows, a:b].mean(axis=0), (b - a) / 60)
    lo, hi = float(np.percentile(prof, 5)), float(prof.max())
    runs = _merge_close(_runs(prof > lo + 0.4 * (hi - lo)), 0.15 * (b - a))
    mid = (c0 + c1) // 2 - a
    hit = [r for r in runs if r[0] <= mid < r[1]]
    best = hit[0] if hit else max(runs, key=lambda r: r[1] - r[0])
    e0, e1 = a + best[0], a + best[1]
    # Never narrower than the shaft band: a dark patch can split the condyle run.
    return min(e0, c0), max(e1, c1)


def _joint_row(
    img: np.ndarray, gy: np.ndarray, gx: np.ndarray, c0: int, c1: int
) -> tuple[int, float]:
    """Row of the joint line along bone columns [c0, c1) and its score (higher = clearer)."""
    h = img.shape[0]
    band = img[:, c0:c1]
    # The gap is darker than BOTH the condyles above and the plateau below (min, not mean: a film
    # edge or collimation border is dark on one side only). Several scales, because the gap spans
    # 3 pixels on a whole-leg film and 20 on a tight joint view.
    v = np.zeros(h, np.float32)
    for frac in (0.01, 0.02, 0.04):
        k = max(2, round(frac * h))
        if h <= 2 * k:
            continue
        # Row i against rows i - k and i + k; the first and last k rows score 0 (no rows there).
        valley = np.minimum(band[: h - 2 * k], band[2 * k :])
        valley -= band[k : h - k]
        np.maximum(valley, 0.0, out=valley)
        # Mean of the positive part: the gap is dark across the whole joint width, while a
        # valley in a few columns (a shaft edge, a label) should not dominate.
        np.maximum(v[k : h - k], valley.mean(axis=1), out=v[k : h - k])
    k = max(3, round(0.02 * h))
    ex = np.abs(gx[:, c0:c1]).mean(axis=1)
    ey = np.abs(gy[:, c0:c1]).mean(axis=1)
    horiz = _smooth1d(ey, k) / (_smooth1d(ex, k) + _smooth1d(ey, k) + 1e-6)
    score = _smooth1d(v, k / 3) * horiz
    margin = round(0.05 * h)  # the joint is never on the very edge of the film
    score[:margin] = 0.0
    score[-margin:] = 0.0
    y = int(np.argmax(score))
    return y, float(score[y])


def _fallback(h: int, w: int, reason: str) -> KneeROI:
    bh, bw = round(h * CENTRE_FRACTION), round(w * CENTRE_FRACTION)
    top, left = (h - bh) // 2, (w - bw) // 2
    return KneeROI((top, left, top + bh, left + bw), (), (), "fallback", reason)


def _square(cy: float, cx: float, side: float, h: int, w: int) -> Box:
    """A square box centred at (cy, cx), shifted (not shrunk) to stay inside the image."""
    side = min(side, float(h), float(w))
    top = int(round(min(max(cy - side / 2, 0.0), h - side)))
    left = int(round(min(max(cx - side / 2, 0.0), w - side)))
    s = int(round(side))
    return top, left, min(h, top + s), min(w, left + s)


def detect_knee_joint(image: np.ndarray) -> KneeROI:
    """Find the knee joint(s) on an AP knee radiograph (float (H, W), bone bright).

    Deterministic, training-free and never raises for a 2-D image: when the detection is not
    plausible the result is a centre crop with ``method == "fallback"`` and a ``reason``.
    """
    if image.ndim != 2 or min(image.shape) < 16:
        h, w = (image.shape[:2] + (1, 1))[:2] if image.ndim >= 1 else (1, 1)
        return _fallback(max(h, 1), max(w, 1), f"unsupported image shape {image.shape}")
    h, w = image.shape
    img: np.ndarray = np.asarray(image, np.float32)
    if not np.isfinite(img.sum()):  # one cheap pass (an overflowing sum only costs the copy)
        img = np.nan_to_num(img)
    scale = WORK_SIDE / max(h, w)
    if scale < 1.0:
        img = cv2.resize(
            img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    else:
        scale = 1.0
    lo, hi = np.percentile(img, [1.0, 99.0])
    if hi - lo < 1e-4:
        return _fallback(h, w, "flat image")
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    wh, ww = img.shape
    sm = cv2.GaussianBlur(img, (0, 0), 1.0)
    gy = cv2.Sobel(sm, cv2.CV_32F, 0, 1, ksize=3)
    gx = cv2.Sobel(sm, cv2.CV_32F, 1, 0, ksize=3)

    legs = _legs(img)
    if not legs:
        return _fallback(h, w, "no leg-like bright column found")
    knees: list[Box] = []
    rows: list[int] = []
    for a, b in legs:
        c0, c1 = _bone_columns(img, a, b)
        if c1 - c0 < 0.03 * ww:
            continue
        y, score = _joint_row(img, gy, gx, c0, c1)
        if score <= 1e-4:
            continue
        e0, e1 = _joint_extent(img, y, a, b, c0, c1)
        side = BOX_SCALE * (e1 - e0) / scale
        knees.append(_square(y / scale, (e0 + e1) / 2 / scale, side, h, w))
        rows.append(int(round(y / scale)))
    if not knees:
        return _fallback(h, w, "no joint line found along the bone columns")
    box = (
        min(k[0] for k in knees),
        min(k[1] for k in knees),
        max(k[2] for k in knees),
        max(k[3] for k in knees),
    )
    return KneeROI(box, tuple(knees), tuple(rows), "detected", f"{len(knees)} knee(s)")


def crop_knee_joint(image: np.ndarray) -> np.ndarray:
    """The knee-joint crop of ``image`` (see :func:`detect_knee_joint`); a view, not a copy."""
    top, left, bottom, right = detect_knee_joint(image).box
    return image[top:bottom, left:right]


def knee_pair(image: np.ndarray) -> np.ndarray:
    """Each detected knee joint as its own square crop, side by side (left to right).

    On a film with both knees, one box around both joints gives each joint only about half of the
    model's pixels; placing the two square joint crops next to each other (then letterboxed by
    :func:`osteoscan.preprocess.preprocess`) gives each its own square, and global pooling averages
    the two knees' features. One knee (or a fallback) gives the plain :func:`crop_knee_joint`.
    """
    roi = detect_knee_joint(image)
    if len(roi.knees) < 2:
        top, left, bottom, right = roi.box
        return image[top:bottom, left:right]
    crops = [image[t:b, lf:r] for t, lf, b, r in sorted(roi.knees, key=lambda k: k[1])]
    side = max(max(c.shape) for c in crops)
    squares = [
        cv2.resize(
            np.ascontiguousarray(c, dtype=np.float32),
            (side, side),
            interpolation=cv2.INTER_AREA if max(c.shape) > side else cv2.INTER_LINEAR,
        )
        for c in crops
    ]
    return np.hstack(squares)
