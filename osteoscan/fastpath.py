"""CPU fast path: a trunk up to its Grad-CAM layer as one frozen oneDNN graph.

On CPU, eager PyTorch runs EfficientNet-Lite0 as 49 convolutions, 49 separate batch-norm passes
and 33 separate ReLU6 passes over the activations, each in its own memory layout conversion.
Measured on the 2-core build machine (1 torch thread, batch 32, 224 px): batch norm and the
activations were 32 % of the forward. :func:`build_fast_features` traces the part of the model
*up to and including* the Grad-CAM layer (``model.forward_features``: timm's API), freezes it
(batch norm folded into the convolutions, weights constant) and lets TorchScript's
``optimize_for_inference`` run it in oneDNN's blocked layout with prepacked weights and the
activations applied in place: about 1.7x the eager trunk (32 → 55 images/s CPU time).

Because the graph ends exactly at the Grad-CAM layer, the rest (``model.forward_head``: pooling
and the classifier heads) stays eager: a Grad-CAM row takes the activation from the same graph as
a plain row, makes it a leaf that requires grad and records only the head. A row's score is
therefore the same whether or not it asked for a heatmap.

Numerics: folding batch norm and oneDNN's kernels change float32 rounding, not the model: on the
190 real knee radiographs of ``../shared/data/knee-xray`` the ``knee-default`` features moved by
at most 1.6e-5 and ensemble probabilities by at most 4.4e-6 (``tests/test_fastpath.py`` pins the
optimised model to the plain one at 1e-5). The graph is batch-size invariant (a row scores the
same in a batch of 7 or 32), unlike the eager convolutions.

Safety: the graph is used only when every check of :func:`build_fast_features` passes on a probe
input (the model has ``forward_features``/``forward_head``; ``forward_features`` returns the very
tensor the Grad-CAM layer produced; ``forward_head`` of it gives the model's own output; the
graph's activation matches the eager one); otherwise, or if tracing fails, the eager model runs
as before. It is built from the weights at that moment: an :class:`~osteoscan.ensemble.Ensemble`
is for inference, its members are never trained afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from osteoscan.gradcam import capture_activation

__all__ = ["FastFeatures", "build_fast_features"]

# How far the graph's Grad-CAM activation may be from the eager one on the probe, relative to the
# activation's largest magnitude (measured: ~3e-6); beyond it the graph is not used.
_PROBE_RTOL = 1e-4


class _Features(nn.Module):
    """``model.forward_features`` as a module's forward (what is traced)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.forward_features(x)  # type: ignore[operator]
        return out


class FastFeatures:
    """The frozen graph ``x → Grad-CAM activation`` and the eager ``activation → logits``."""

    def __init__(self, graph: Any, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.graph = graph
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The Grad-CAM layer's activation for a (B, 3, H, W) float32 CPU batch (no autograd)."""
        with torch.no_grad():
            out: torch.Tensor = self.graph(x)
        return out


def _has_split(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and callable(
        getattr(model, "forward_head", None)
    )


def build_fast_features(
    model: nn.Module, cam_layer: nn.Module, input_hw: tuple[int, int]
) -> FastFeatures | None:
    """A :class:`FastFeatures` for an eval-mode CPU ``model``, or None where it does not apply.

    ``cam_layer`` is the model's Grad-CAM layer; ``input_hw`` the model input size. Returns
    None (the caller keeps the eager model) unless every check in the module docstring passes.
    """
    if not _has_split(model) or model.training:
        return None
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, *input_hw, generator=gen).contiguous(
        memory_format=torch.channels_last
    )
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch.jit prints deprecation FutureWarnings; this use is checked right below.
            warnings.simplefilter("ignore")
            with capture_activation(cam_layer) as store:
                act = model.forward_features(probe)  # type: ignore[operator]
                ends_at_cam = bool(store) and store[0] is act
            if not ends_at_cam:
                return None  # forward_features does not end at the Grad-CAM layer
            if not torch.equal(model.forward_head(act), model(probe)):  # type: ignore[operator]
                return None  # the model's forward is not forward_head(forward_features(x))
            traced = torch.jit.trace(_Features(model).eval(), probe, check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            got = graph(probe)
            scale = float(act.abs().max()) or 1.0
            if got.shape != act.shape or float((got - act).abs().max()) > _PROBE_RTOL * scale:
                return None
    except Exception:  # noqa: BLE001 - any failure to build the graph leaves the eager model
        return None
    return FastFeatures(graph, model.forward_head)  # type: ignore[arg-type]
