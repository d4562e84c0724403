"""Tests for batched ensemble Grad-CAM: contract, localisation, fusion order, hooks, memory."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from osteoscan.archs import create_model, get_arch
from osteoscan.ensemble import Ensemble
from osteoscan.gradcam import (
    cam_from_forward,
    capture_activation,
    forward_for_cam,
    fuse_cams,
    normalize_maps,
    overlay,
    screening_logodds,
)
from osteoscan.package import Manifest, MemberSpec, ModelPackage

SIZE = 64


def _package(models: list[nn.Module]) -> ModelPackage:
    specs = [MemberSpec.for_arch("tiny_cnn", input_size=SIZE) for _ in models]
    manifest = Manifest(
        name="cam-test",
        version="1",
        classes=["normal", "osteoporosis"],
        positive_classes=["osteoporosis"],
        preprocess={"size": SIZE},
        members=specs,
    )
    return ModelPackage(Path("."), manifest, models)


def _ensemble(models: list[nn.Module], cam_layers: list[str] | None = None) -> Ensemble:
    return Ensemble(_package(models), "cpu", cam_layers=cam_layers)


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny_cnn", 2).eval()


class SquareDetector(nn.Module):
    """Positive logit up with bright regions, down with dark background (a signed test)."""

    def __init__(self) -> None:
        super().__init__()
        # stride 4: the CAM layer is 16x16 for a 64x64 input, so upsampling is exercised
        self.features = nn.Sequential(nn.Conv2d(3, 2, 4, stride=4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0].fill_(1.0 / 48)  # channel 0: brightness
            self.features[0].weight[1].fill_(-1.0 / 48)  # channel 1: darkness
            self.features[0].bias.zero_()
            self.classifier.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, -5.0]]))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _square_images(n: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Dark noisy background with one bright 12x12 square at a different place per image."""
    rng = np.random.default_rng(0)
    imgs, corners = [], []
    for i in range(n):
        img = rng.uniform(0.05, 0.2, (SIZE, SIZE))
        r, c = 4 + 13 * i % 44, 40 - 11 * i % 36
        img[r : r + 12, c : c + 12] = 1.0
        imgs.append(img)
        corners.append((r, c))
    x = torch.from_numpy((np.stack(imgs) * 65535).astype(np.uint16)).unsqueeze(1)
    return x, corners


def _hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_heatmap_localises_bright_square() -> None:
    x, corners = _square_images(4)
    ens = _ensemble([SquareDetector()], cam_layers=["features"])
    pred = ens.predict(x, heatmaps=[True] * 4)
    for hm, (r, c) in zip(pred.heatmaps, corners, strict=True):
        assert hm is not None and hm.shape == (SIZE, SIZE)
        pr, pc = np.unravel_index(np.argmax(hm), hm.shape)
        assert r - 2 <= pr < r + 14 and c - 2 <= pc < c + 14, ((pr, pc), (r, c))
        inside = np.zeros_like(hm, dtype=bool)
        inside[r : r + 12, c : c + 12] = True
        assert hm[inside].mean() > 0.4 and hm[~inside].mean() < 0.05


def test_contract_shape_range_and_rows() -> None:
    ens = _ensemble([_tiny(0), _tiny(1)])
    x, _ = _square_images(5)
    pred = ens.predict(x, heatmaps=[False, True, True, False, True])
    assert [h is None for h in pred.heatmaps] == [True, False, False, True, False]
    maps = np.stack([h for h in pred.heatmaps if h is not None])
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for h in maps:  # each non-degenerate map spans [0, 1]
        assert h.max() == pytest.approx(1.0) or h.max() == 0.0


def test_members_fused_before_normalising() -> None:
    strong = torch.zeros(1, 4, 4)
    strong[0, 0, 0] = 10.0
    weak = torch.zeros(1, 4, 4)
    weak[0, 3, 3] = 0.1
    fused = fuse_cams([strong, weak])[0]
    assert fused[0, 0] == 1.0
    assert fused[3, 3] == pytest.approx(0.01)  # not 1.0, as normalise-then-average would give 0.5
    wrong = (normalize_maps(strong) + normalize_maps(weak)) / 2
    assert wrong[0, 3, 3] == pytest.approx(0.5)


def test_normalize_maps_degenerate() -> None:
    maps = torch.stack([torch.zeros(5, 5), torch.full((5, 5), 3.0), torch.arange(25.0).view(5, 5)])
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(5, 5)) and torch.equal(out[1], torch.zeros(5, 5))
    assert out[2].min() == 0.0 and out[2].max() == 1.0


def test_screening_logodds() -> None:
    z = torch.tensor([[1.0, 3.0], [2.0, -1.0]])
    np.testing.assert_allclose(screening_logodds(z, [1], 2.0), [1.0, -1.5])
    z3 = torch.randn(4, 3)
    p = torch.softmax(z3 / 1.5, 1)
    score = p[:, 1:].sum(1)
    np.testing.assert_allclose(
        screening_logodds(z3, [1, 2], 1.5), torch.log(score / (1 - score)), atol=1e-5
    )
    # shift invariance: adding a constant to every logit leaves the target alone
    np.testing.assert_allclose(
        screening_logodds(z3 + 7, [2]), screening_logodds(z3, [2]), atol=1e-5
    )


def _gradcam(
    model: nn.Module, layer: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One member's (detached logits, raw Grad-CAM at input size) for positive class 1."""
    fw = forward_for_cam(model, layer, x)
    cam = cam_from_forward(fw, [1], out_size=(int(x.shape[-2]), int(x.shape[-1])))
    return fw.logits.detach().float(), cam


def test_refuses_inference_mode_and_frozen_params_still_work() -> None:
    model = _tiny(0)
    layer = model.get_submodule(get_arch("tiny_cnn").cam_layer)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        _gradcam(model, layer, x)
    for p in model.parameters():
        p.requires_grad_(False)  # as during stage-one fine-tuning
    logits, cam = _gradcam(model, layer, x)
    assert logits.shape == (2, 2) and cam.shape == (2, SIZE, SIZE)
    assert all(p.grad is None for p in model.parameters())


def test_no_hooks_left_and_no_param_grads() -> None:
    models = [_tiny(0), _tiny(1)]
    ens = _ensemble(models)
    x, _ = _square_images(4)
    ens.predict(x, heatmaps=[True, False, True, True])
    assert all(_hooks_left(m) == 0 for m in models)
    assert all(p.grad is None for m in models for p in m.parameters())
    # released on error too
    layer = models[0].get_submodule("features.2")
    with pytest.raises(RuntimeError, match="boom"), capture_activation(layer):
        raise RuntimeError("boom")
    assert _hooks_left(models[0]) == 0
    assert not torch.nn.modules.module._global_forward_hooks


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    # type() rather than isinstance(): some deprecated torch objects warn on attribute access
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_memory_flat_over_many_heatmap_batches() -> None:
    ens = _ensemble([_tiny(0), _tiny(1)])
    x, _ = _square_images(8)
    ask = [True, False] * 4
    modes: list[Any] = [ask, "flagged"]  # explicit rows, and flagged rows in the same pass
    for i in range(6):  # warm up allocator and caches
        ens.predict(x, heatmaps=modes[i % 2], threshold=0.5)
    tensors0, rss0 = _live_tensors(), _rss_bytes()
    for i in range(30):
        pred = ens.predict(x, heatmaps=modes[i % 2], threshold=0.5)
    del pred
    tensors1, rss1 = _live_tensors(), _rss_bytes()
    assert tensors1 <= tensors0, (tensors0, tensors1)
    assert rss1 - rss0 < 20 * 2**20, (rss1 - rss0) / 2**20


def test_overlay() -> None:
    img = np.tile(np.linspace(0, 65535, SIZE, dtype=np.float64), (SIZE, 1)).astype(np.uint16)
    hm = np.zeros((SIZE, SIZE), np.float32)
    hm[:8, :8] = 1.0
    out = overlay(img, hm)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    # alpha 0 → the greyscale model input itself
    grey = overlay(img, hm, alpha=0.0)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_allclose(grey[..., 0], img / 257.0, atol=1)
    # hot region is red in RGB (JET colormap), cold region is blue
    assert out[2, 2, 0] > out[2, 2, 2]
    assert out[40, 2, 2] > out[40, 2, 0]
    # a heatmap at another size is resized to the image
    assert overlay(img, hm[::2, ::2]).shape == (SIZE, SIZE, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_flat_and_localises() -> None:
    x, corners = _square_images(4)
    ens = Ensemble(_package([SquareDetector()]), "cuda", cam_layers=["features"])
    for _ in range(3):
        ens.predict(x, heatmaps=[True] * 4)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(30):
        pred = ens.predict(x, heatmaps=[True, True, False, True])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before
    r, c = corners[0]
    pr, pc = np.unravel_index(np.argmax(pred.heatmaps[0]), (SIZE, SIZE))
    assert r - 2 <= pr < r + 14 and c - 2 <= pc < c + 14


class _InplaceAfterCam(nn.Module):
    """The CAM layer's output is modified in place by its successor (torchvision style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("grad_mode", [True, False])
def test_inplace_successor_and_grad_mode_restored(grad_mode: bool) -> None:
    torch.manual_seed(0)
    model = _InplaceAfterCam().eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.set_grad_enabled(grad_mode):
        logits, cam = _gradcam(model, model.conv, x)
        assert torch.is_grad_enabled() is grad_mode
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x), atol=1e-6)
    assert cam.shape == (3, SIZE, SIZE) and (cam >= 0).all()
    # reference Grad-CAM computed by hand: grads of the log-odds w.r.t. the conv output
    act = model.conv(x).detach().requires_grad_(True)
    z = model.fc(torch.relu(act).mean(dim=(2, 3)))
    (g,) = torch.autograd.grad((z[:, 1] - z[:, 0]).sum(), act)
    ref = torch.relu((g.mean(dim=(2, 3), keepdim=True) * act.detach()).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(ref, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    np.testing.assert_allclose(cam, ref, atol=1e-6)
