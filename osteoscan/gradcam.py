"""Batched Grad-CAM for ensembles, computed in the same forward pass as the prediction.

Output contract (as pytorch-grad-cam): float32 ``(B, H, W)`` in ``[0, 1]`` at model input size.

How it avoids the pitfalls seen in pytorch-grad-cam's issue tracker:

- **Hooks leaking memory**: the only hook is a forward hook on the target layer, registered by
  :func:`capture_activation` (a context manager) and removed on exit, also on error. Gradients
  come from ``torch.autograd.grad`` with respect to the captured activation only, so no parameter
  ``.grad`` is ever filled in and nothing outlives the call.
- **CAMs under ``inference_mode``**: :func:`forward_for_cam` records autograd from the Grad-CAM
  layer onwards (it fails loudly if called inside ``inference_mode``); the caller runs only the
  rows that need a heatmap through it and everything else under ``inference_mode``. The backbone
  below the layer runs without autograd (the hook switches it on), so a heatmap row costs about
  what an inference row costs plus a backward pass through the small head.
- **One target per image**: the target is each row's own screening score; the per-row targets
  are summed and differentiated once. Rows are independent in eval mode (BatchNorm uses running
  statistics, no cross-row mixing), so each row's gradient is its own target's gradient.
- **Normalising before fusing an ensemble**: members' raw maps (ReLU'd, upsampled) are averaged
  first and only then min-max normalised per image (:func:`fuse_cams`), so a member with a weak,
  flat map cannot be blown up to full scale.

Target: the **log-odds of the screening score**, ``logsumexp(z_pos / T) - logsumexp(z_neg / T)``
with ``z`` the member's logits and ``T`` its calibration temperature. It is exactly the quantity
``score = sum of positive-class probabilities`` thresholds on, invariant to adding a constant to all
logits (a bare positive logit is not), and, unlike a probability or a log-probability, it does not
saturate when the model is confident, so gradients stay informative for the high-scoring images we
explain (flagged ones). For a binary model it is ``(z_pos - z_neg) / T``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osteoscan.constants import U16_MAX


@contextlib.contextmanager
def capture_activation(
    layer: nn.Module, *, grad_from_here: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Record ``layer``'s output during the ``with`` block; the hook is always removed on exit.

    With ``grad_from_here=True`` (used by :func:`forward_for_cam` inside ``torch.no_grad()``) the
    recorded output is a fresh leaf that requires grad and autograd is switched on from this
    layer onwards, so only the head after the Grad-CAM layer is recorded: the backbone runs at
    inference cost and keeps no activations for backward. The layer's successor receives a clone
    of the leaf, so an in-place op there (``ReLU(inplace=True)``) cannot alter what was recorded.
    The enclosing ``no_grad`` block restores the previous grad mode on exit.
    """
    store: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Grad-CAM layer must output a tensor, got {type(output).__name__}")
        store.clear()  # a layer run twice keeps its last output
        if not grad_from_here:
            store.append(output)
            return None
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        torch.set_grad_enabled(True)
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
        store.clear()


def screening_logodds(
    logits: torch.Tensor, positive_idx: Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """Per-row log-odds of the screening score, ``(B, C)`` logits → ``(B,)`` (float32)."""
    z = logits.float() / float(temperature)
    n_classes = z.shape[1]
    pos = list(positive_idx)
    neg = [i for i in range(n_classes) if i not in set(pos)]
    if not pos:
        raise ValueError("Grad-CAM needs at least one positive class")
    pos_term = torch.logsumexp(z[:, pos], dim=1)
    if not neg:  # every class positive: score is constant, fall back to the positive evidence
        return pos_term
    return pos_term - torch.logsumexp(z[:, neg], dim=1)


@dataclass
class CamForward:
    """A forward pass kept open for Grad-CAM: logits with the head's graph, and the activation.

    ``logits`` (B, C) carry autograd history from the Grad-CAM layer on; ``act`` (B, K, h, w) is
    that layer's output as a leaf. Dropping the object frees the graph.
    """

    logits: torch.Tensor
    act: torch.Tensor


def forward_for_cam(
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
) -> CamForward:
    """Forward ``x`` recording autograd from ``layer`` on only (see :func:`capture_activation`).

    ``autocast`` is a factory for the mixed-precision context of the forward pass (the backward
    in :func:`cam_from_forward` runs outside it, as PyTorch recommends).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Grad-CAM cannot run under torch.inference_mode(); call it outside")
    ctx = autocast or contextlib.nullcontext
    with capture_activation(layer, grad_from_here=True) as store:
        # Gradients are off up to the Grad-CAM layer and switched on by its hook: the same
        # forward pass yields the prediction and the graph of the head only, and frozen
        # parameters (two-stage fine-tuning) do not matter.
        with torch.no_grad(), ctx():
            logits = model(x)
        if not store:
            raise RuntimeError("the Grad-CAM layer was not reached in the forward pass")
        act = store[0]
    if act.ndim != 4:
        raise ValueError(f"Grad-CAM layer must output (B, K, h, w), got {tuple(act.shape)}")
    if not logits.requires_grad:
        raise RuntimeError("the model's logits do not depend on the Grad-CAM layer")
    return CamForward(logits=logits, act=act)


def cam_from_forward(
    fw: CamForward,
    positive_idx: Sequence[int],
    temperature: float = 1.0,
    out_size: tuple[int, int] | None = None,
    rows: torch.Tensor | None = None,
    *,
    retain_graph: bool = False,
) -> torch.Tensor:
    """Raw Grad-CAM maps (R, H, W) float32 for ``rows`` (default all) of an open forward pass.

    ``ReLU(sum_k mean_hw(dT/dA_k) * A_k)`` bilinearly upsampled to ``out_size`` (default: the
    activation's size), not normalised (see :func:`fuse_cams`). One backward pass; the graph is
    freed afterwards, so call it at most once per :class:`CamForward` - unless
    ``retain_graph``: members sharing one trunk share ``act`` and the graph up to their heads
    (:func:`osteoscan.trunks.forward_heads_for_cam`); each member's backward needs that part.
    """
    act = fw.act
    logits = fw.logits if rows is None else fw.logits.index_select(0, rows)
    out_size = out_size or (int(act.shape[-2]), int(act.shape[-1]))
    if logits.shape[0] == 0:
        return torch.zeros(0, *out_size, device=act.device)
    with torch.enable_grad():
        target = screening_logodds(logits, positive_idx, temperature)
        (grad,) = torch.autograd.grad(target.sum(), act, retain_graph=retain_graph)
    a = act.detach()
    if rows is not None:
        grad, a = grad.index_select(0, rows), a.index_select(0, rows)
    weights = grad.float().mean(dim=(2, 3), keepdim=True)  # (R, K, 1, 1)
    cam = torch.relu((weights * a.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)
    return cam[:, 0]


def normalize_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each (H, W) map of a (B, H, W) batch to [0, 1].

    A map with no spread (all zero: nothing supported the score) stays all zeros.
    """
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    out = torch.where(span > eps, (maps - lo) / span.clamp_min(eps), torch.zeros_like(maps))
    return out.clamp_(0.0, 1.0)


def fuse_cams(raw_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average members' raw (B, H, W) maps, THEN normalise each image to [0, 1]."""
    if not raw_maps:
        raise ValueError("no Grad-CAM maps to fuse")
    return normalize_maps(torch.stack(list(raw_maps)).mean(dim=0))


def overlay(
    model_input_u16: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Draw ``heatmap`` (H, W) in [0, 1] over the model input (H, W) uint16 → uint8 RGB (H, W, 3).

    Drawn on the model input (what the network saw), not the original file. A heatmap of a
    different size is resized to the image.
    """
    img = np.asarray(model_input_u16)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise ValueError(f"expected a (H, W) image, got shape {img.shape}")
    scale = 255.0 / (U16_MAX if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0)
    grey = np.clip(img.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    hm: np.ndarray = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if hm.shape != grey.shape:
        hm = cv2.resize(hm, (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_LINEAR)
    hm8 = np.clip(hm * 255.0, 0, 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(hm8, colormap), cv2.COLOR_BGR2RGB)
    grey3 = np.repeat(grey[:, :, None], 3, axis=2)
    out = (1.0 - alpha) * grey3.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
