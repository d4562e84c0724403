"""Batched, seeded random affine augmentation on single-channel integer tensors.

The papers' augmentation set (rotation 20°, shifts 20 %, shear 20 %, zoom 20 %, horizontal flip)
as *one* affine resample per image: the parameters are composed into a single 2×3 matrix per
image, so an image is interpolated once, not five times, and the whole batch goes through one
``F.affine_grid`` + ``F.grid_sample`` on whatever device holds it. Areas moved in from outside
the image are black (0), the same as the letterbox padding of
:func:`osteoscan.preprocess.preprocess`.

Randomness comes from a private ``torch.Generator`` on the CPU, so a run is reproducible by seed
and gives the same augmentations on CPU and GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from osteoscan.constants import U16_MAX
from osteoscan.train.recipe import AugmentConfig

__all__ = ["RandomAffine", "affine_matrices"]


def _uniform(n: int, bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound


def affine_matrices(cfg: AugmentConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """Sample ``n`` random forward affine transforms as float64 (n, 3, 3) matrices.

    Coordinates are the normalised [-1, 1] coordinates of ``affine_grid`` (square images), so a
    shift of ``f`` times the image side is ``2 f``. Order: zoom → shear → rotate → flip → shift.
    """
    angle = _uniform(n, math.radians(cfg.rotation), gen)
    shift = _uniform(2 * n, 2.0 * cfg.shift, gen).view(n, 2)
    shear = _uniform(n, cfg.shear, gen)
    zoom = 1.0 + _uniform(n, cfg.zoom, gen)
    flip = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.hflip

    eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    z = eye.clone()
    z[:, 0, 0] = zoom
    z[:, 1, 1] = zoom
    sh = eye.clone()
    sh[:, 0, 1] = shear
    rot = eye.clone()
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
    fl = eye.clone()
    fl[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    tr = eye.clone()
    tr[:, :2, 2] = shift
    return tr @ fl @ rot @ sh @ z


class RandomAffine:
    """Callable augmenter: integer (B, 1, H, W) or (B, H, W) batch in → same shape and dtype out.

    Settings live in ``__init__``, data in ``__call__`` (MONAI style). ``seed`` fixes the sequence
    of random transforms; call :meth:`reseed` to restart it.
    """

    def __init__(self, cfg: AugmentConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or AugmentConfig()
        self.gen = torch.Generator(device="cpu")
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random sequence from ``seed``."""
        self.gen.manual_seed(int(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply one random affine transform per image; identity when augmentation is off."""
        if not self.cfg.enabled or x.shape[0] == 0:
            return x
        squeeze = x.ndim == 3
        if squeeze:
            x = x.unsqueeze(1)
        n = x.shape[0]
        fwd = affine_matrices(self.cfg, n, self.gen)
        # affine_grid maps *output* coordinates to input coordinates: the inverse transform.
        theta = torch.linalg.inv(fwd)[:, :2, :].to(device=x.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        src = x.to(torch.float32)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if x.dtype.is_floating_point:
            out = out.to(x.dtype)
        else:
            hi = 255.0 if x.dtype == torch.uint8 else U16_MAX
            out = out.round_().clamp_(0.0, hi).to(x.dtype)
        return out.squeeze(1) if squeeze else out
