"""Every registered architecture builds, runs, and exposes resolvable Grad-CAM/head/block paths."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from osteoscan.archs import (
    create_model,
    final_linear,
    freeze_backbone,
    get_arch,
    get_module,
    list_archs,
    num_blocks,
    unfreeze_top,
)

ARCHS = list_archs()


@functools.cache
def _built(name: str) -> nn.Module:
    """One random-init 3-class model per architecture, shared by the tests of this module.

    Building VGG-16 alone costs ~1 s; every test resets what it changes (freezing starts with
    ``freeze_backbone``, forwards run under ``no_grad``).
    """
    return create_model(name, num_classes=3)


def test_registry_holds_the_papers_architectures() -> None:
    expected = {
        "vgg16",
        "efficientnet_b0",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "resnet50",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "tiny_cnn",
    }
    assert expected <= set(ARCHS)
    with pytest.raises(KeyError, match="known: "):
        get_arch("alexnet")


@pytest.mark.parametrize("name", ARCHS)
def test_arch_builds_and_runs_channels_last(name: str) -> None:
    spec = get_arch(name)
    model = _built(name).eval()
    assert model.osteoscan_arch == name and model.pretrained_source == "random"
    assert len(spec.mean) == len(spec.std) == 3 and spec.default_size >= 32
    # 64 px keeps the heavy networks fast; every registered net pools adaptively.
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    # Paths resolve: the Grad-CAM layer gives a spatial map, the head ends in a 3-way linear.
    seen: list[torch.Tensor] = []
    hook = get_module(model, spec.cam_layer).register_forward_hook(
        lambda _m, _i, out: seen.append(out)
    )
    with torch.no_grad():
        model(x[:1])
    hook.remove()
    assert len(seen) == 1 and seen[0].ndim == 4 and seen[0].shape[1] >= 8
    path, layer = final_linear(model, name)
    assert layer.out_features == 3 and path.startswith(spec.head)
    assert num_blocks(model, name) >= 3
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "name", ["tiny_cnn", "resnet50", "efficientnet_lite0", "mobilenet_v3_large"]
)
def test_two_stage_freezing(name: str) -> None:
    spec = get_arch(name)
    model = _built(name)
    freeze_backbone(model, name)
    stage1 = _trainable(model)
    head = {
        f"{spec.head}.{n}".lstrip(".") for n, _ in get_module(model, spec.head).named_parameters()
    }
    assert stage1 == head
    unfreeze_top(model, name, 1)
    stage2 = _trainable(model)
    assert stage1 < stage2 < {n for n, _ in model.named_parameters()}
    unfreeze_top(model, name, 2)
    assert stage2 < _trainable(model)
    unfreeze_top(model, name, 99)
    assert all(p.requires_grad for p in model.parameters())


def test_unfreeze_top_units() -> None:
    resnet = _built("resnet50")
    freeze_backbone(resnet, "resnet50")
    unfreeze_top(resnet, "resnet50", 1)
    assert {n.split(".")[0] for n in _trainable(resnet)} == {"layer4", "fc"}
    vgg = _built("vgg16")
    assert num_blocks(vgg, "vgg16") == 5  # the paper's five VGG blocks
    freeze_backbone(vgg, "vgg16")
    unfreeze_top(vgg, "vgg16", 1)  # block 5 = conv5_1..conv5_3 = features.24/26/28
    convs = {n.split(".")[1] for n in _trainable(vgg) if n.startswith("features.")}
    assert convs == {"24", "26", "28"}
    lite = _built("efficientnet_lite0")
    freeze_backbone(lite, "efficientnet_lite0")
    unfreeze_top(lite, "efficientnet_lite0", 1)
    tops = {n.split(".")[0] for n in _trainable(lite)}
    assert tops == {"blocks", "conv_head", "bn2", "classifier"}
    assert all(n.startswith("blocks.6") for n in _trainable(lite) if n.startswith("blocks"))


def test_tiny_cnn_is_tiny_and_fast() -> None:
    model = create_model("tiny_cnn", num_classes=3)
    assert sum(p.numel() for p in model.parameters()) < 10_000


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError):
        create_model("tiny_cnn", num_classes=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ARCHS)
def test_arch_cuda_amp_channels_last(name: str) -> None:
    model = create_model(name, num_classes=3).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        y = model(x)
    with torch.no_grad():
        ref = model(x)
    assert torch.isfinite(y).all()
    assert ((y.float() - ref).norm() / ref.norm().clamp_min(1e-6)).item() < 0.05
