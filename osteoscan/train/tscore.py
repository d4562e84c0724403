"""T-scores and WHO category probabilities (NumPy only: scan and evaluate use it without torch).

A T-score model (:class:`osteoscan.train.objectives.TScoreObjective`) gives, for a predicted
T-score ``mu`` and error scale ``tau``, the logits of ``normal, osteopenia, osteoporosis``

    z = (0, (c1 - mu) / tau, (c1 + c2 - 2 mu) / tau),   c1 = -1, c2 = -2.5 (WHO cut-offs),

so ``log P(osteopenia) / P(normal) = (c1 - mu) / tau`` and ``log P(osteoporosis) /
P(osteopenia) = (c2 - mu) / tau``. :func:`tscore_from_probs` inverts that for each member
(with its temperature, if any, folded into ``tau``) and averages the members' T-scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# WHO: T >= -1 normal, -2.5 < T < -1 osteopenia, T <= -2.5 osteoporosis.
CUTOFFS: tuple[float, float] = (-1.0, -2.5)
TINY = 1e-30  # probabilities are clipped here before logs (float32 underflow)


def tscore_logits(mu: np.ndarray, tau: float) -> np.ndarray:
    """(N, 3) logits of normal/osteopenia/osteoporosis for predicted T-scores ``mu``."""
    mu = np.asarray(mu, dtype=np.float64)
    c1, c2 = CUTOFFS
    z = np.stack([np.zeros_like(mu), c1 - mu, c1 + c2 - 2.0 * mu], axis=1)
    return z / float(tau)


def tscore_from_probs(member_probs: np.ndarray, scales: Sequence[float]) -> np.ndarray:
    """Predicted T-score per row: the mean over members of each member's inverted ``mu``.

    ``member_probs`` (B, M, 3) are the members' calibrated probabilities (normal, osteopenia,
    osteoporosis); ``scales[m]`` is member m's ``tau`` times its temperature. Each member's
    ``mu`` comes from the neighbouring pair of probabilities least touched by underflow.
    """
    p = np.clip(np.asarray(member_probs, dtype=np.float64), TINY, None)
    tau = np.asarray(scales, dtype=np.float64)[None, :]
    c1, c2 = CUTOFFS
    mu01 = c1 - tau * (np.log(p[..., 1]) - np.log(p[..., 0]))
    mu12 = c2 - tau * (np.log(p[..., 2]) - np.log(p[..., 1]))
    use01 = np.minimum(p[..., 0], p[..., 1]) >= np.minimum(p[..., 1], p[..., 2])
    return np.where(use01, mu01, mu12).mean(axis=1)


def member_scales(target: dict[str, Any] | None, temperatures: Sequence[float]) -> list[float]:
    """Each member's effective ``tau`` (its fitted scale times its temperature) from a
    manifest's ``target`` entry (``{"kind": "tscore", "scale": [..]}``)."""
    if not target or target.get("kind") != "tscore":
        raise ValueError("not a T-score model")
    scale = target.get("scale")
    scales = list(scale) if isinstance(scale, list) else [float(scale or 1.0)] * len(temperatures)
    return [float(s) * float(t) for s, t in zip(scales, temperatures, strict=True)]
