"""The pieces of a training step that :mod:`osteoscan.train.loop` puts together: seeds, class
weights, the validation AUC, mixed precision, frozen batch-norm layers, a model's logits over a
uint16 batch, the optimiser, the learning-rate schedule and the shuffled batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from osteoscan.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from osteoscan.train.recipe import TrainConfig

__all__ = [
    "autocast",
    "class_weights",
    "freeze_bn_stats",
    "lr_lambda",
    "make_optimizer",
    "positive_auc",
    "predict_logits",
    "rate",
    "seed_everything",
    "shuffled_batches",
]


def seed_everything(seed: int) -> None:
    """Seed Python-side torch and NumPy RNGs (the loop itself uses private generators)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C * n_c)`` (0 for classes absent from ``y``)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def positive_auc(y: np.ndarray, probs: np.ndarray, positive_idx: Sequence[int]) -> float:
    """ROC-AUC of the summed positive-class probability vs the rest; NaN if one side is empty."""
    is_pos = np.isin(np.asarray(y), list(positive_idx))
    if is_pos.all() or not is_pos.any():
        return float("nan")
    return float(roc_auc_score(is_pos, probs[:, list(positive_idx)].sum(axis=1)))


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA when ``amp`` (bfloat16 where supported); nothing otherwise."""
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def freeze_bn_stats(model: nn.Module) -> None:
    """Put batch-norm layers whose parameters are all frozen into eval mode."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            params = list(mod.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                mod.eval()


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    channels_last: bool = True,
    amp: bool = False,
    flip: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Logits (N, C) float32 of ``model`` in eval mode for a uint16 batch (N, 1, S, S);
    ``flip``: the mean of the logits of each image and its mirror image (test-time flip, as
    :class:`~osteoscan.ensemble.Ensemble` computes it). ``progress(done, total)`` after each
    batch."""
    device = torch.device(device)
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(device, non_blocking=True)
        inp = to_model_input(xb, mean, std, channels_last=channels_last)
        with autocast(device, amp):
            logits = model(inp).float()
            if flip:
                logits = (logits + model(inp.flip(-1)).float()) / 2
            out.append(logits.cpu())
        if progress is not None:
            progress(min(i + batch_size, x.shape[0]), x.shape[0])
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names over ``params`` at learning rate ``lr``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def lr_lambda(cfg: TrainConfig, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay (or flat)."""

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if cfg.schedule != "cosine" or total_steps <= warmup_steps:
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return fn


def rate(n: int, seconds: float) -> float:
    """Images per second (0 when nothing was timed)."""
    return float(n / seconds) if seconds > 0 and n else 0.0


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    chunks = list(perm.split(batch_size))
    # A batch of one breaks batch norm in train mode: fold it into the previous batch.
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        last = chunks.pop()  # popped first: the slot to extend is then the new last one
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks
