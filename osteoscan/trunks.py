"""Shared trunks: ensemble members whose backbone weights are identical run the backbone once.

A *trunk* is every tensor of a member's ``state_dict`` outside its architecture's head module
(``ArchSpec.head``, e.g. ``classifier``); the *head* is the rest. Probe ensembles (several heads
trained on one frozen pretrained backbone, like ``knee-default``) have byte-identical trunks, so
the backbone's output is the same for all of them and only the heads differ.

Whether two members share a trunk is decided from the weights themselves (:func:`trunk_digest`, a
sha256 over every trunk tensor's name, dtype, shape and bytes), never from a flag in a manifest.
The shared forward (:func:`forward_shared`) runs the first member's whole model once, captures
the input of its head module with a hook, and applies the other members' heads to that input.
It checks that the model's output *is* its head's output (true for every registered
architecture: the classifier is the last module called), so a model whose forward does more
after the head is refused rather than scored wrongly.

With Grad-CAM (:func:`forward_heads_for_cam`) the members share the Grad-CAM activation and the
graph from it to their heads' input; each member's heatmap then differs only through its own
head's gradient, and the backward passes must retain the shared graph
(``cam_from_forward(..., retain_graph=True)``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from osteoscan.archs import get_arch, get_module
from osteoscan.fastpath import FastFeatures, build_fast_features
from osteoscan.gradcam import CamForward, forward_for_cam


def head_prefix(arch: str) -> str:
    """State-dict key prefix of ``arch``'s head module (``"classifier."``)."""
    head = get_arch(arch).head
    if not head:
        raise ValueError(f"{arch}: the head is the whole model, there is no trunk to share")
    return head + "."


def split_state(
    state: Mapping[str, torch.Tensor], arch: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(trunk, head)`` tensors of a state dict; the head: all keys under :func:`head_prefix`."""
    prefix = head_prefix(arch)
    trunk = {k: v for k, v in state.items() if not k.startswith(prefix)}
    head = {k: v for k, v in state.items() if k.startswith(prefix)}
    return trunk, head


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (memory layout ignored)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # Reinterpret as bytes (any dtype, also 0-dim) from a standard-strided copy, so a
        # channels_last weight hashes like its contiguous twin.
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def trunk_digest(model: nn.Module, arch: str) -> str:
    """:func:`tensors_digest` of ``model``'s trunk (its state dict outside the head)."""
    trunk, _ = split_state(model.state_dict(), arch)
    return tensors_digest(trunk)


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """The head module of ``model`` (``ArchSpec.head``)."""
    return get_module(model, get_arch(arch).head)


@dataclass
class _HeadIO:
    input: torch.Tensor | None = None
    output: object = None


@contextlib.contextmanager
def _capture_head_io(head: nn.Module) -> Iterator[_HeadIO]:
    """Record the (single tensor) input and the output of ``head``; hooks removed on exit."""
    io = _HeadIO()

    def pre(_m: nn.Module, args: tuple[object, ...]) -> None:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise TypeError("a shared trunk needs a head called with one tensor")
        io.input = args[0]

    def post(_m: nn.Module, _args: object, output: object) -> None:
        io.output = output

    handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
    try:
        yield io
    finally:
        for h in handles:
            h.remove()


def _features(io: _HeadIO, logits: torch.Tensor) -> torch.Tensor:
    if io.input is None or io.output is not logits:
        raise RuntimeError(
            "the model's output is not its head's output: its trunk cannot be shared"
        )
    return io.input


def forward_shared(
    model: nn.Module, head: nn.Module, other_heads: Sequence[nn.Module], x: torch.Tensor
) -> list[torch.Tensor]:
    """Logits of ``model`` on ``x`` and of each of ``other_heads`` on the same trunk features.

    Runs in the caller's grad / inference / autocast mode. ``head`` is ``model``'s own head.
    """
    if not other_heads:
        return [model(x)]
    with _capture_head_io(head) as io:
        logits = model(x)
    feats = _features(io, logits)
    return [logits, *(h(feats) for h in other_heads)]


def forward_heads_for_cam(
    model: nn.Module,
    layer: nn.Module,
    head: nn.Module,
    other_heads: Sequence[nn.Module],
    x: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
) -> list[CamForward]:
    """:func:`~osteoscan.gradcam.forward_for_cam` of ``model``, plus one open forward per head
    of ``other_heads`` sharing its Grad-CAM activation (backpropagate with ``retain_graph``)."""
    if not other_heads:
        return [forward_for_cam(model, layer, x, autocast)]
    with _capture_head_io(head) as io:
        first = forward_for_cam(model, layer, x, autocast)
    feats = _features(io, first.logits)
    ctx = autocast or contextlib.nullcontext
    with torch.enable_grad(), ctx():  # the heads' graphs, from the shared features on
        return [first, *(CamForward(logits=h(feats), act=first.act) for h in other_heads)]


@dataclass
class TrunkGroup:
    """Ensemble members (indices, in order) that run one trunk: ``models[members[0]]`` runs it.

    ``fast`` is the CPU fast path of the trunk (:mod:`osteoscan.fastpath`), when the ensemble
    enabled it (:meth:`enable_fast`) and it could be built; otherwise the eager model runs.
    """

    members: list[int]
    model: nn.Module
    head: nn.Module
    other_heads: list[nn.Module]
    fast: FastFeatures | None = None

    def enable_fast(self, cam_layer: nn.Module, input_hw: tuple[int, int]) -> bool:
        """Build the fast path now (~2 s for EfficientNet-Lite0: before a scan's first batch,
        not during it); False when it does not apply and the eager model stays."""
        self.fast = build_fast_features(self.model, cam_layer, input_hw)
        return self.fast is not None

    def _heads(self, act: torch.Tensor, fast: FastFeatures) -> list[torch.Tensor]:
        """Each member's logits from the Grad-CAM activation (the eager rest of the model)."""
        if not self.other_heads:
            return [fast.head(act)]
        with _capture_head_io(self.head) as io:
            logits = fast.head(act)
        feats = _features(io, logits)
        return [logits, *(h(feats) for h in self.other_heads)]

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """float32 logits of each member on ``x`` (caller's grad / inference / autocast mode)."""
        fast = self.fast
        if fast is not None:
            return [lg.float() for lg in self._heads(fast.features(x), fast)]
        return [lg.float() for lg in forward_shared(self.model, self.head, self.other_heads, x)]

    def cam_forwards(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        autocast: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ) -> list[CamForward]:
        """One open Grad-CAM forward per member (:func:`forward_heads_for_cam`).

        With the fast path, the activation comes from the graph (no autograd below it, as in
        :func:`~osteoscan.gradcam.forward_for_cam`) and only the heads are recorded.
        """
        fast = self.fast
        if fast is None:
            return forward_heads_for_cam(
                self.model, layer, self.head, self.other_heads, x, autocast
            )
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Grad-CAM cannot run under torch.inference_mode(); call it outside")
        act = fast.features(x).detach().requires_grad_(True)
        with torch.enable_grad():
            return [CamForward(logits=lg, act=act) for lg in self._heads(act, fast)]


def trunk_groups(
    models: Sequence[nn.Module], archs: Sequence[str], keys: Sequence[object], share: bool = True
) -> list[TrunkGroup]:
    """Group members by architecture, :func:`trunk_digest` (the weights, never a flag) and
    ``keys[i]`` (what else must match: model input, Grad-CAM layer), in order of first member.
    ``share=False`` gives one group per member."""
    full = [
        (arch, trunk_digest(model, arch), key) if share else i
        for i, (model, arch, key) in enumerate(zip(models, archs, keys, strict=True))
    ]
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(full):
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        first, *rest = (head_module(models[m], archs[m]) for m in members)
        out.append(TrunkGroup(members, models[members[0]], first, rest))
    return out
