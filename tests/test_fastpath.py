"""The CPU fast path (osteoscan.fastpath): the optimised trunk scores like the plain eager model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from osteoscan.archs import create_model, get_arch, get_module
from osteoscan.ensemble import Ensemble
from osteoscan.fastpath import build_fast_features
from osteoscan.package import Manifest, MemberSpec, ModelPackage

CLASSES = ["normal", "osteopenia", "osteoporosis"]
SIZE = 64  # any size works for the architecture; small keeps the test quick
TEMPS = [4.7, 2.0]


@pytest.fixture(scope="module")
def probes() -> list[torch.nn.Module]:
    """Two probe heads on one efficientnet_lite0 trunk with trained-like batch-norm statistics."""
    torch.manual_seed(0)
    base = create_model("efficientnet_lite0", 3)
    base.train()
    with torch.no_grad():
        base(torch.randn(4, 3, SIZE, SIZE))
    base.eval()
    members = []
    for seed in (1, 2):
        m = copy.deepcopy(base)
        torch.manual_seed(seed)
        with torch.no_grad():
            m.classifier.weight.normal_(0.0, 0.5)
        members.append(m.eval())
    return members


def _ensemble(models: list[torch.nn.Module], **kw: object) -> Ensemble:
    specs = [
        MemberSpec.for_arch("efficientnet_lite0", input_size=SIZE, temperature=t)
        for t in TEMPS[: len(models)]
    ]
    man = Manifest(
        name="fast-test", version="1", classes=CLASSES, positive_classes=["osteoporosis"],
        threshold=0.3, body_parts=["knee"], preprocess={"size": SIZE}, members=specs,
    )  # fmt: skip
    return Ensemble(ModelPackage(Path("."), man, models), "cpu", **kw)  # type: ignore[arg-type]


def _images(n: int) -> torch.Tensor:
    """Smooth, radiograph-like uint16 inputs (noise would exercise nothing the model sees)."""
    g = torch.Generator().manual_seed(5)
    low = torch.rand(n, 1, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bicubic").clamp(0, 1)
    return (img * 65535).round().to(torch.int32).to(torch.uint16)


@pytest.fixture(scope="module")
def pair(probes: list[torch.nn.Module]) -> tuple[Ensemble, Ensemble]:
    return _ensemble(copy.deepcopy(probes)), _ensemble(copy.deepcopy(probes), fast_cpu=False)


def test_optimised_trunk_scores_like_the_plain_model(pair: tuple[Ensemble, Ensemble]) -> None:
    fast, plain = pair
    x = _images(10)
    got, want = fast.predict(x), plain.predict(x)
    assert [g.fast is not None for g in fast.groups] == [True]  # one shared trunk, optimised
    assert [g.fast for g in plain.groups] == [None]
    np.testing.assert_allclose(got.member_probs, want.member_probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.score, want.score, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got.flagged, want.flagged)
    assert float(np.ptp(got.score)) > 1e-3  # the images score differently: not a constant model


def test_heatmap_rows_score_exactly_like_plain_rows(pair: tuple[Ensemble, Ensemble]) -> None:
    fast, plain = pair
    x = _images(6)
    without = fast.predict(x)
    every = fast.predict(x, heatmaps=[True] * 6)
    # Both paths take the activation from the same graph: identical scores, not merely close.
    np.testing.assert_array_equal(every.member_probs, without.member_probs)
    reference = plain.predict(x, heatmaps=[True] * 6)
    for got, want in zip(every.heatmaps, reference.heatmaps, strict=True):
        assert got is not None and want is not None and got.shape == (SIZE, SIZE)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert all(not m._forward_hooks for model in fast.models for m in model.modules())


def test_rows_score_the_same_in_any_batch(pair: tuple[Ensemble, Ensemble]) -> None:
    fast, _ = pair
    x = _images(9)
    whole = fast.predict(x).member_probs
    parts = np.concatenate([fast.predict(x[:4]).member_probs, fast.predict(x[4:]).member_probs])
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-6)


def test_no_fast_path_where_the_split_does_not_hold(probes: list[torch.nn.Module]) -> None:
    lite = probes[0]
    # A Grad-CAM layer that is not where forward_features ends: keep the eager model.
    assert build_fast_features(lite, get_module(lite, "blocks"), (SIZE, SIZE)) is None
    tiny = create_model("tiny_cnn", 3).eval()  # no forward_features / forward_head
    tiny_cam = get_module(tiny, get_arch("tiny_cnn").cam_layer)
    assert build_fast_features(tiny, tiny_cam, (32, 32)) is None
    lite.train()  # batch statistics would be frozen wrongly
    try:
        assert build_fast_features(lite, get_module(lite, "bn2"), (SIZE, SIZE)) is None
    finally:
        lite.eval()
