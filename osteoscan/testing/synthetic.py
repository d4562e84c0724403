"""Synthetic radiographs for tests, demos and benchmarks, and the files that hold them.

Nothing here is medical data. :func:`synthetic_knee` draws a radiograph-like AP knee (femur and
tibia shafts, condyles, joint space, fibula, soft tissue) whose *trabecular texture* is controlled
by ``density``: ``1.0`` gives dense, fine, well-connected trabeculae and a thick cortex; ``0.3``
gives sparse, coarse, broken trabeculae and a thin cortex, as in osteoporosis. A small CNN can
learn the classes from texture alone. Everything is deterministic by ``seed``.

:func:`write_dicom`, :func:`write_png` and the other writers live in
:mod:`osteoscan.testing.files` and are re-exported here, so one import serves a test that draws an
image and stores it.
"""

from __future__ import annotations

import cv2
import numpy as np

from osteoscan.testing.files import (
    BASIC_TEXT_SR,
    encode_stored,
    invert_monochrome,
    write_dicom,
    write_png,
    write_structured_report,
)

__all__ = [
    "BASIC_TEXT_SR",
    "synthetic_knee",
    "synthetic_chest",
    "encode_stored",
    "write_dicom",
    "write_structured_report",
    "write_png",
    "invert_monochrome",
]


def _blur(img: np.ndarray, sx: float, sy: float | None = None) -> np.ndarray:
    sy = sx if sy is None else sy
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sx), sigmaY=float(sy))


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _trabeculae(
    h: int, w: int, density: float, rng: np.random.Generator, scale: float
) -> np.ndarray:
    """Network of bright plates/rods in [0, 1].

    The zero crossings of band-pass filtered noise form a connected cellular network. Dense bone:
    small cells (fine spacing), thick-ish struts everywhere. Porotic bone: larger cells, thinner
    struts, and whole regions of struts removed (loss of connectivity). Blur is anisotropic
    because weight-bearing trabeculae run mostly along the bone axis.
    """
    d = float(np.clip(density, 0.05, 1.5))
    sigma = scale * (1.0 + 2.2 * (1.0 - min(d, 1.0)))  # cell size grows as density falls
    noise = rng.standard_normal((h, w)).astype(np.float32)
    band = _blur(noise, sigma, 1.8 * sigma) - _blur(noise, 2.0 * sigma, 3.6 * sigma)
    band /= float(band.std()) + 1e-8
    width = 0.18 + 0.22 * min(d, 1.0)  # strut thickness
    struts = np.exp(-((band / width) ** 2))
    # Connectivity loss: a smooth random field removes struts where it is below a threshold that
    # rises as density falls (no removal at density >= 1).
    field = _blur(rng.standard_normal((h, w)).astype(np.float32), 4.0 * sigma)
    field /= float(field.std()) + 1e-8
    keep = _smoothstep(-0.3, 0.3, field + 2.0 * (min(d, 1.0) - 0.4))
    return (struts * keep).astype(np.float32)


def _leg(
    yy: np.ndarray, xx: np.ndarray, cx: float, jit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-tissue, bone and joint-space masks (floats in [0,1]) for one knee centred at ``cx``."""
    dx = xx - cx
    # Soft tissue: a vertical column, widest at the joint.
    half = 0.20 + 0.05 * np.exp(-(((yy - 0.5) / 0.2) ** 2)) + jit[0]
    soft = 1.0 - _smoothstep(half - 0.02, half + 0.02, np.abs(dx))
    joint_y = 0.50 + jit[1]
    # Femur: shaft flaring into the metaphysis; the distal end is two rounded condyles.
    fem_hw = 0.075 + jit[2] + 0.085 * _smoothstep(joint_y - 0.22, joint_y - 0.04, yy)
    condyle_bottom = joint_y - 0.015 - 0.025 * np.cos(np.clip(dx / 0.16, -1.6, 1.6) * np.pi) ** 2
    condyle_bottom += 0.04 * _smoothstep(0.12, 0.17, np.abs(dx))
    femur = (np.abs(dx) < fem_hw) & (yy < condyle_bottom)
    # Tibia: plateau just below the joint space, narrowing into the shaft.
    plateau = joint_y + 0.015 + 0.006 * np.cos(dx / 0.16 * np.pi)
    tib_hw = 0.07 + jit[3] + 0.09 * (1.0 - _smoothstep(plateau + 0.02, plateau + 0.2, yy))
    tibia = (np.abs(dx) < tib_hw) & (yy > plateau)
    # Fibula: thin lateral shaft with a small head below the plateau.
    fib_cx = cx + np.sign(jit[4] + 1e-9) * 0.13
    fib_hw = 0.018 + 0.012 * np.exp(-(((yy - (plateau + 0.07)) / 0.04) ** 2))
    fibula = (np.abs(xx - fib_cx) < fib_hw) & (yy > plateau + 0.04)
    # Patella: faint ellipse superimposed on the femoral condyles (AP view).
    patella = (((dx - jit[5]) / 0.06) ** 2 + ((yy - (joint_y - 0.07)) / 0.075) ** 2) < 1.0
    bone = (femur | tibia | fibula).astype(np.float32)
    return soft.astype(np.float32), bone, patella.astype(np.float32)


def synthetic_knee(
    size: int = 256, seed: int = 0, density: float = 1.0, both_knees: bool = False
) -> np.ndarray:
    """A radiograph-like AP knee, float32 (size, size) in [0, 1], bone bright.

    ``density`` scales the trabecular texture (1.0 dense and fine, 0.3 sparse and coarse) as well
    as cortical thickness and bone brightness, the way mineral loss shows on a radiograph.
    ``both_knees`` draws two legs side by side (a bilateral standing view). Deterministic by
    ``seed``: the same arguments always give the same array.
    """
    size = int(size)
    if size < 16:
        raise ValueError("size must be >= 16")
    d = float(density)
    rng = np.random.default_rng([int(seed), 0x05_7E_05])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    scale = size / 256.0  # texture and blur scale with resolution
    centres = [0.27, 0.73] if both_knees else [0.5 + rng.uniform(-0.03, 0.03)]
    shrink = 0.55 if both_knees else 1.0

    soft = np.zeros((size, size), np.float32)
    bone = np.zeros_like(soft)
    patella = np.zeros_like(soft)
    for cx in centres:
        jit = rng.uniform(-0.012, 0.012, size=6).astype(np.float32)
        # Shrinking the horizontal coordinate narrows each leg for the bilateral view.
        s, b, p = _leg(yy, cx + (xx - cx) / shrink, cx, jit)
        soft, bone, patella = np.maximum(soft, s), np.maximum(bone, b), np.maximum(patella, p)

    # Cortex: a bright rim whose thickness falls with density (cortical thinning).
    bone_u8 = (bone > 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(bone_u8, cv2.DIST_L2, 3).astype(np.float32)
    cortex_px = max(1.0, scale * (2.0 + 3.5 * min(max(d, 0.0), 1.2)))
    cortex = bone * (1.0 - _smoothstep(cortex_px * 0.6, cortex_px, dist))
    # Cortex is thickest along the shafts; soften it in the epiphyses (spongy ends).
    trab = _trabeculae(size, size, d, rng, 1.3 * scale)

    img = 0.03 + 0.20 * soft
    img += bone * (0.22 + 0.10 * min(d, 1.2))  # marrow/background bone brightness
    img += bone * trab * (0.10 + 0.22 * min(d, 1.2))
    img += cortex * (0.18 + 0.17 * min(d, 1.2))
    img += 0.05 * patella * soft
    # Soft tissue is thicker in the middle of the column: a slow vertical and lateral gradient.
    img += 0.03 * soft * np.cos((xx - 0.5) * np.pi) * (0.7 + 0.3 * yy)
    img = _blur(img.astype(np.float32), 0.6 * scale)
    img += rng.normal(0.0, 0.008, img.shape).astype(np.float32)  # quantum noise
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def synthetic_chest(size: int = 256, seed: int = 0) -> np.ndarray:
    """A radiograph-like PA chest (lungs, mediastinum, spine, ribs), float32 in [0, 1]."""
    size = int(size)
    rng = np.random.default_rng([int(seed), 0xC4E57])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    body = 1.0 - _smoothstep(0.40, 0.46, np.abs(xx - 0.5))
    img = 0.05 + 0.45 * body
    for side in (-1.0, 1.0):
        cx = 0.5 + side * (0.19 + rng.uniform(-0.01, 0.01))
        lung = ((xx - cx) / 0.14) ** 2 + ((yy - 0.48) / 0.32) ** 2 < 1.0
        img -= 0.28 * _blur(lung.astype(np.float32), 2.0)
        # Ribs: curved bright bands across each lung field.
        for k in range(9):
            y0 = 0.2 + 0.07 * k
            rib = np.abs(yy - (y0 + 0.25 * (xx - cx) ** 2 * 4 * side * (xx - cx))) < 0.012
            img += 0.10 * (rib & (np.abs(xx - cx) < 0.18)).astype(np.float32)
    spine = np.abs(xx - 0.5) < 0.04
    img += 0.25 * spine.astype(np.float32)
    heart = ((xx - 0.54) / 0.12) ** 2 + ((yy - 0.62) / 0.11) ** 2 < 1.0
    img += 0.15 * heart.astype(np.float32)
    img = _blur(img.astype(np.float32), 1.0 * size / 256)
    img += rng.normal(0.0, 0.008, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
