"""Cache what the frozen part of a network computes, so an epoch trains only the rest.

While the stem and the lower blocks are frozen (no gradient, batch norm in eval mode) they are a
fixed function of the input image, and on a CPU recomputing them every epoch is most of an
epoch's cost. Measured with EfficientNet-Lite0 at 224 px on 2 CPU cores: the stem and the first
three of seven stages run forward at 31 images/s, the top four stages *train* at 33 images/s,
so together an epoch runs at 16 images/s; with the prefix cached it runs at 33.

:class:`FrozenPrefix` computes the frozen prefix once per training stage:

- training images in ``views`` versions: view 0 the image itself, views 1.. one random
  augmentation each (drawn from the fit's augmenter, so a run stays reproducible by seed); each
  epoch then draws one view per image. This trades the fresh augmentation of every epoch for a
  fixed set of augmented copies, which is why it is a recipe option (``feature_views``) and not
  the default;
- validation images once, unaugmented: exactly what the uncached network computes (with
  ``flip``, their mirror images too: the validation logits are then the test-time-flip mean).

Features are stored as float16 for training views (half the memory; the noise is far below that
of augmentation) and float32 for validation, whose logits choose the best epoch and calibrate.
Supported: timm EfficientNet/MobileNet-style networks (``conv_stem``, ``bn1``, ``blocks``,
``conv_head``, ``bn2``, ``global_pool``, ``classifier``), which covers the default architectures;
other networks train uncached (:func:`split_frozen` returns ``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from osteoscan.preprocess import to_model_input

__all__ = ["FrozenPrefix", "Split", "split_frozen"]

_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass
class Split:
    """``prefix(x)`` (frozen, run once) and ``rest(features)`` (trained) of one network."""

    prefix: Callable[[torch.Tensor], torch.Tensor]
    rest: Callable[[torch.Tensor], torch.Tensor]
    where: str  # e.g. "blocks[3:]": what trains


def split_frozen(model: nn.Module) -> Split | None:
    """Split ``model`` at its first trainable module (None: unsupported, or nothing frozen)."""
    if not all(hasattr(model, p) for p in _PARTS) or not isinstance(model.blocks, nn.Sequential):
        return None
    m: Any = model
    if _trainable(m.conv_stem) or _trainable(m.bn1):
        return None
    blocks = list(m.blocks)
    first = next((i for i, b in enumerate(blocks) if _trainable(b)), len(blocks))
    drop = float(getattr(m, "drop_rate", 0.0) or 0.0)

    def stem(x: torch.Tensor, upto: int) -> torch.Tensor:
        x = m.bn1(m.conv_stem(x))
        for b in blocks[:upto]:
            x = b(x)
        return x

    def head(x: torch.Tensor) -> torch.Tensor:
        x = m.global_pool(m.bn2(m.conv_head(x)))
        return m.classifier(F.dropout(x, p=drop, training=m.training) if drop else x)

    if first < len(blocks) or _trainable(m.conv_head) or _trainable(m.bn2):

        def rest(f: torch.Tensor) -> torch.Tensor:
            for b in blocks[first:]:
                f = b(f)
            return head(f)

        return Split(lambda x: stem(x, first), rest, f"blocks[{first}:] and the head")

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return m.global_pool(m.bn2(m.conv_head(stem(x, len(blocks)))))

    def classifier(f: torch.Tensor) -> torch.Tensor:
        return m.classifier(F.dropout(f, p=drop, training=m.training) if drop else f)

    return Split(pooled, classifier, "the classifier")


class FrozenPrefix:
    """Cached prefix features of one stage; see the module docstring."""

    def __init__(
        self,
        split: Split,
        train_x: torch.Tensor,
        val_x: torch.Tensor,
        *,
        views: int,
        augment: Callable[[torch.Tensor], torch.Tensor],
        norm: tuple[Sequence[float], Sequence[float]],
        channels_last: bool,
        batch_size: int,
        flip: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.split, self.views = split, max(1, int(views))
        self._norm, self._cl, self._bs = norm, channels_last, batch_size
        total = self.views * train_x.shape[0] + val_x.shape[0] * (2 if flip else 1)
        self._done, self._total, self._progress = 0, total, progress
        first = self._features(train_x, None, torch.float16)
        # (views, N, ...), filled in place: stacking a list would hold every view twice.
        self.train = torch.empty((self.views, *first.shape), dtype=torch.float16)
        self.train[0] = first
        del first
        for v in range(1, self.views):
            self.train[v] = self._features(train_x, augment, torch.float16)
        self.val = self._features(val_x, None, torch.float32)
        self.val_mirror = self._features(val_x.flip(-1), None, torch.float32) if flip else None

    @torch.inference_mode()
    def _features(
        self, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:  # fmt: skip
        out = []
        for i in range(0, x.shape[0], self._bs):
            xb = x[i : i + self._bs]
            xb = augment(xb) if augment is not None else xb
            f = self.split.prefix(to_model_input(xb, *self._norm, channels_last=self._cl))
            out.append(f.to(dtype).cpu())
            self._done += xb.shape[0]
            if self._progress is not None:
                self._progress(self._done, self._total)
        if not out:
            return torch.zeros(0)
        return torch.cat(out)

    def batch(self, idx: torch.Tensor, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training features of rows ``idx``, one randomly drawn view per row, as float32."""
        view = torch.randint(0, self.views, (idx.numel(),), generator=gen)
        f = self.train[view, idx].to(device=device, dtype=torch.float32)
        return f.contiguous(memory_format=torch.channels_last) if self._cl and f.ndim == 4 else f

    @torch.inference_mode()
    def val_logits(self, device: torch.device, batch_size: int) -> torch.Tensor:
        """Logits of the validation images (the caller has put the model in eval mode); with
        ``flip``, the mean of each image's and its mirror image's."""
        logits = self._logits(self.val, device, batch_size)
        if self.val_mirror is not None:
            logits = (logits + self._logits(self.val_mirror, device, batch_size)) / 2
        return logits

    def _logits(self, feats: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
        out = []
        for i in range(0, feats.shape[0], batch_size):
            f = feats[i : i + batch_size].to(device)
            if self._cl and f.ndim == 4:
                f = f.contiguous(memory_format=torch.channels_last)
            out.append(self.split.rest(f).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
