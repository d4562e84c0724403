"""What a member learns: class labels, ordered grades, or a continuous T-score.

Every objective ends in the same place: a network whose last ``nn.Linear`` gives one logit per
class, so a trained member is an ordinary package member and the scan's machinery (temperature,
score = P(positive classes), threshold, covariate fusion, Grad-CAM) works unchanged.

- :class:`ClassObjective`: softmax cross-entropy (the default).
- :class:`OrdinalObjective` (``--ordinal``): the *adjacent-category logit* model, an ordinal
  regression model (Agresti, Categorical Data Analysis, ch. 8): one latent severity
  ``s(x) = w . f(x)`` and ``log P(k) / P(k-1) = s(x) + b_k - b_(k-1)``. In logits that is
  ``z_k = k s(x) + b_k``: the last layer's weight is constrained to the rank-one form
  ``W[k] = k w`` (a ``torch.nn.utils.parametrize`` parametrisation while training, removed after,
  so the saved layer is a plain ``nn.Linear``). The grades are one ordered scale by construction,
  and the loss is the model's likelihood (cross-entropy on those logits).
- :class:`SoftOrdinalObjective` (``--ordinal --ordinal-head soft``): an unconstrained softmax
  head trained on *soft ordinal labels* (Diaz and Marathe, "Soft labels for ordinal regression",
  CVPR 2019): the target of an image of grade ``y`` is ``q_k ∝ exp(-(k - y)^2)``, so a
  neighbouring grade costs less than a far one, while each grade keeps its own weight vector
  (grade 0 vs 1 and grade 2 vs 3 need not lie on one severity axis, as the rank-one form forces).
- :class:`TScoreObjective` (``--target tscore``): a one-output regression head trained on
  standardised T-scores (mean squared error). After training, the predicted T-score ``mu`` gives
  the WHO category probabilities through the same adjacent-category form with the WHO cut-offs
  as boundaries, ``log P(k) / P(k-1) = (c_k - mu) / tau`` (``c`` = -1, -2.5): at ``mu = c_k`` the
  two neighbouring categories are equally likely, and ``tau``, the scale of the prediction error,
  is fitted by maximum likelihood on the validation part (the calibrated error). That is linear
  in ``mu``, so the regression layer is folded into a 3-logit ``nn.Linear``; the predicted
  T-score is recovered exactly from any two neighbouring probabilities
  (:func:`osteoscan.train.tscore.tscore_from_probs`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from osteoscan.archs import final_linear, get_module
from osteoscan.train.calibrate import fit_temperature, softmax
from osteoscan.train.tscore import CUTOFFS, tscore_logits

__all__ = [
    "ClassObjective", "OrdinalObjective", "SoftOrdinalObjective", "TScoreObjective",
    "make_objective",
]  # fmt: skip


def _auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if is_pos.all() or not is_pos.any():
        return float("nan")
    return float(roc_auc_score(is_pos, score))


class ClassObjective:
    """Softmax cross-entropy on class indices."""

    kind = "class"
    calibrate_temperature = True

    def __init__(self, n_classes: int, positive_idx: list[int], label_smoothing: float = 0.0):
        self.n_classes, self.positive_idx, self.smoothing = n_classes, positive_idx, label_smoothing

    def n_outputs(self) -> int:
        """Outputs of the network while training."""
        return self.n_classes

    def prepare(self, model: nn.Module, arch: str) -> None:
        """Adapt a freshly built network (nothing for plain classes)."""

    def target(self, y: np.ndarray, device: torch.device) -> torch.Tensor:
        """Training targets on ``device``."""
        return torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)

    def loss(self, out: torch.Tensor, target: torch.Tensor, weight: Any) -> torch.Tensor:
        """Training loss of a batch."""
        return F.cross_entropy(out.float(), target, weight=weight, label_smoothing=self.smoothing)

    def class_weights_for(self, y: np.ndarray) -> np.ndarray | None:
        """Class indices for inverse-frequency weights (None: the loss takes no weights)."""
        return np.asarray(y)

    def validate(self, out: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(validation loss, AUC of the positive classes vs the rest) of raw outputs."""
        lt = torch.from_numpy(out)
        loss = float(F.cross_entropy(lt, torch.from_numpy(np.asarray(y, dtype=np.int64))))
        probs = softmax(out)
        is_pos = np.isin(np.asarray(y), self.positive_idx)
        return loss, _auc(is_pos, probs[:, self.positive_idx].sum(axis=1))

    def finish(self, model: nn.Module, arch: str, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Turn the trained network into a class-logit network; returns validation logits."""
        return out

    def record(self) -> dict[str, Any] | None:
        """The manifest's ``target`` entry for this member (None: plain classes)."""
        return None


class _RankOne(nn.Module):
    """Parametrisation ``W[k] = k * w``: the adjacent-category logit model's weight."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def _ranks(self, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.k, dtype=like.dtype, device=like.device)[:, None]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self._ranks(w) * w

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        r = self._ranks(weight)
        return (r * weight).sum(0, keepdim=True) / (r * r).sum()


class OrdinalObjective(ClassObjective):
    """Ordered classes: the adjacent-category logit head (see the module docstring)."""

    kind = "ordinal"

    def prepare(self, model: nn.Module, arch: str) -> None:
        """Constrain the class-logit layer to the rank-one ordinal form."""
        _, layer = final_linear(model, arch)
        parametrize.register_parametrization(layer, "weight", _RankOne(self.n_classes))

    def finish(self, model: nn.Module, arch: str, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Make the constrained weight a plain parameter (same values, ordinary state dict)."""
        _, layer = final_linear(model, arch)
        if parametrize.is_parametrized(layer):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        return out

    def record(self) -> dict[str, Any] | None:
        return {"kind": "ordinal"}


class SoftOrdinalObjective(ClassObjective):
    """Ordered classes: a plain softmax head on soft ordinal labels (see the module docstring)."""

    kind = "ordinal"

    def __init__(self, n_classes: int, positive_idx: list[int], label_smoothing: float = 0.0):
        super().__init__(n_classes, positive_idx, label_smoothing)
        k = torch.arange(n_classes, dtype=torch.float32)
        # Row y: the soft target of grade y (squared grade distance, unit scale as in the paper).
        self.soft = torch.softmax(-((k[None, :] - k[:, None]) ** 2), dim=1)

    def loss(self, out: torch.Tensor, target: torch.Tensor, weight: Any) -> torch.Tensor:
        q = self.soft.to(out.device)[target]
        per_image = -(q * F.log_softmax(out.float(), dim=1)).sum(dim=1)
        if weight is None:
            return per_image.mean()
        w = weight.to(out.device)[target]
        return (w * per_image).sum() / w.sum()

    def record(self) -> dict[str, Any] | None:
        return {"kind": "ordinal", "head": "soft"}


class TScoreObjective(ClassObjective):
    """Regression on T-scores, folded into WHO-category logits (see the module docstring).

    Classes are ``normal, osteopenia, osteoporosis``; targets are T-scores.
    """

    kind = "tscore"
    calibrate_temperature = False  # tau is the calibration: a temperature would only rescale it

    def __init__(self, n_classes: int, positive_idx: list[int], t_train: np.ndarray) -> None:
        super().__init__(n_classes, positive_idx)
        t = np.asarray(t_train, dtype=np.float64)
        self.mean = float(t.mean()) if len(t) else 0.0
        self.std = float(t.std()) if len(t) > 1 and t.std() > 0 else 1.0
        self.fit: dict[str, float] = {}

    def n_outputs(self) -> int:
        return 1

    def target(self, y: np.ndarray, device: torch.device) -> torch.Tensor:
        t = (np.asarray(y, dtype=np.float64) - self.mean) / self.std
        return torch.as_tensor(t, dtype=torch.float32, device=device)

    def loss(self, out: torch.Tensor, target: torch.Tensor, weight: Any) -> torch.Tensor:
        return F.mse_loss(out.float()[:, 0], target)

    def class_weights_for(self, y: np.ndarray) -> np.ndarray | None:
        return None

    def predicted(self, out: np.ndarray) -> np.ndarray:
        """Predicted T-scores of raw (standardised) outputs."""
        return np.asarray(out, dtype=np.float64)[:, 0] * self.std + self.mean

    def _is_pos(self, t: np.ndarray) -> np.ndarray:
        cats = np.where(t <= CUTOFFS[1], 2, np.where(t >= CUTOFFS[0], 0, 1))
        return np.isin(cats, self.positive_idx)

    def validate(self, out: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        t = np.asarray(y, dtype=np.float64)
        mu = self.predicted(out)
        loss = float(np.mean(((mu - t) / self.std) ** 2)) if len(t) else float("nan")
        return loss, _auc(self._is_pos(t), -mu)  # lower predicted T = more positive

    def finish(self, model: nn.Module, arch: str, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Fit tau on the validation part, fold the regression layer into 3 WHO logits."""
        t = np.asarray(y, dtype=np.float64)
        mu = self.predicted(out)
        base = tscore_logits(mu, 1.0)
        cats = np.where(t <= CUTOFFS[1], 2, np.where(t >= CUTOFFS[0], 0, 1))
        # Maximum likelihood of the categories given mu: exactly a temperature fit of base logits.
        tau = fit_temperature(base, cats) if len(t) >= 2 else 1.0
        resid = mu - t
        self.fit = {
            "tau": float(tau),
            "val_mae": float(np.mean(np.abs(resid))) if len(t) else float("nan"),
            "val_rmse": float(np.sqrt(np.mean(resid**2))) if len(t) else float("nan"),
        }
        path, layer = final_linear(model, arch)
        w, b = layer.weight.detach().double()[0], layer.bias.detach().double()[0]
        k = torch.arange(3, dtype=torch.float64)
        c = torch.tensor([0.0, CUTOFFS[0], CUTOFFS[0] + CUTOFFS[1]], dtype=torch.float64)
        # z_k = (C_k - k mu) / tau with mu = std (w.f + b) + mean.
        new = nn.Linear(layer.in_features, 3, bias=True)
        with torch.no_grad():
            new.weight.copy_((-(k * self.std / tau))[:, None] * w[None, :])
            new.bias.copy_((c - k * (self.mean + self.std * b)) / tau)
        parent, _, attr = path.rpartition(".")
        setattr(get_module(model, parent), attr, new.to(layer.weight.device))
        return (base / tau).astype(np.float32)

    def record(self) -> dict[str, Any] | None:
        fit = self.fit
        return {"kind": "tscore", "cutoffs": list(CUTOFFS), "scale": fit.get("tau", 1.0),
                "val_mae": fit.get("val_mae"), "val_rmse": fit.get("val_rmse")}  # fmt: skip


def make_objective(
    target: str, ordinal: bool, n_classes: int, positive_idx: list[int],
    label_smoothing: float = 0.0, t_train: np.ndarray | None = None, ordinal_head: str = "adjacent",
) -> ClassObjective:  # fmt: skip
    """The objective for ``--target``/``--ordinal``/``--ordinal-head`` (T-score: ``t_train``
    standardises)."""
    if target == "tscore":
        return TScoreObjective(n_classes, positive_idx, np.asarray(t_train, dtype=np.float64))
    if ordinal and ordinal_head == "soft":
        return SoftOrdinalObjective(n_classes, positive_idx, label_smoothing)
    if ordinal:
        return OrdinalObjective(n_classes, positive_idx, label_smoothing)
    return ClassObjective(n_classes, positive_idx, label_smoothing)
