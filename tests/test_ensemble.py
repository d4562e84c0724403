"""Tests for the ensemble runner: calibration, averaging, score / flag, fusion, heatmap rows."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from osteoscan.archs import create_model
from osteoscan.covariates import Covariates
from osteoscan.ensemble import BatchPrediction, Ensemble, resolve_amp
from osteoscan.fusion import fit_fusion
from osteoscan.package import Manifest, MemberSpec, ModelPackage, load_package, save_package

CLASSES = ["normal", "osteopenia", "osteoporosis"]
SIZE = 32


def manifest(specs: list[MemberSpec], **kw: Any) -> Manifest:
    base: dict[str, Any] = {
        "name": "test",
        "version": "1",
        "classes": list(CLASSES),
        "positive_classes": ["osteoporosis"],
        "threshold": 0.3,
        "body_parts": ["knee"],
        "preprocess": {"size": SIZE},
        "members": specs,
    }
    return Manifest(**{**base, **kw})


def member(temperature: float = 1.0, input_size: int = SIZE) -> MemberSpec:
    return MemberSpec.for_arch("tiny_cnn", input_size=input_size, temperature=temperature)


def tiny(seed: int, n_classes: int = 3, sharpen: float = 20.0) -> torch.nn.Module:
    """tiny_cnn with a scaled-up head so logits differ clearly between classes and images."""
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", n_classes)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(sharpen)
    return model.eval()


def make_ensemble(
    models: list[torch.nn.Module], temps: list[float] | None = None, **kw: Any
) -> Ensemble:
    temps = temps or [1.0] * len(models)
    specs = [member(t) for t in temps]
    pkg = ModelPackage(Path("."), manifest(specs, **kw), models)
    return Ensemble(pkg, torch.device("cpu"))


def batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 65536, (n, 1, SIZE, SIZE), generator=g, dtype=torch.int32).to(
        torch.uint16
    )


def test_probabilities_shapes_and_sum_to_one() -> None:
    ens = make_ensemble([tiny(0), tiny(1)])
    pred = ens.predict(batch())
    assert isinstance(pred, BatchPrediction) and len(pred) == 6
    assert pred.probs.shape == (6, 3) and pred.probs.dtype == np.float32
    assert pred.member_probs.shape == (6, 2, 3)
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(pred.member_probs.sum(2), 1.0, atol=1e-5)
    assert pred.heatmaps == [None] * 6 and pred.covariates_used == [""] * 6
    assert ens.classes == CLASSES and ens.input_size == SIZE and ens.body_parts == ["knee"]
    assert ens.positive_classes == ["osteoporosis"] and ens.threshold == pytest.approx(0.3)


def test_temperature_softens() -> None:
    model = tiny(0)
    x = batch()
    sharp = make_ensemble([model], [1.0]).predict(x).probs
    soft = make_ensemble([model], [4.0]).predict(x).probs
    assert (soft.max(1) < sharp.max(1)).all()
    np.testing.assert_array_equal(soft.argmax(1), sharp.argmax(1))  # same ranking
    logits = make_ensemble([model]).predict_member_logits(x)[0]
    np.testing.assert_allclose(soft, torch.softmax(logits / 4.0, 1).numpy(), atol=1e-6)


def test_member_averaging() -> None:
    a, b = tiny(0), tiny(1)
    x = batch()
    pa = make_ensemble([a], [1.5]).predict(x).probs
    pb = make_ensemble([b], [0.7]).predict(x).probs
    both = make_ensemble([a, b], [1.5, 0.7]).predict(x)
    np.testing.assert_allclose(both.probs, (pa + pb) / 2, atol=1e-6)
    np.testing.assert_allclose(both.member_probs[:, 0], pa, atol=1e-6)
    np.testing.assert_allclose(both.member_probs[:, 1], pb, atol=1e-6)


def test_member_logits_are_raw() -> None:
    ens = make_ensemble([tiny(0), tiny(1)], [2.0, 3.0])
    x = batch()
    logits = ens.predict_member_logits(x)
    assert logits.shape == (2, 6, 3) and logits.dtype == torch.float32
    pred = ens.predict(x)
    calibrated = torch.softmax(logits / torch.tensor([2.0, 3.0]).view(2, 1, 1), -1)
    np.testing.assert_allclose(pred.member_probs, calibrated.permute(1, 0, 2).numpy(), atol=1e-6)


def test_score_flag_threshold_and_prediction() -> None:
    ens = make_ensemble(
        [tiny(0), tiny(1)], positive_classes=["osteopenia", "osteoporosis"], threshold=0.5
    )
    x = batch(16)
    pred = ens.predict(x)
    np.testing.assert_allclose(pred.score, pred.probs[:, 1:].sum(1), atol=1e-6)
    np.testing.assert_array_equal(pred.flagged, pred.score >= 0.5)
    assert pred.prediction == [CLASSES[i] for i in pred.probs.argmax(1)]
    assert pred.threshold == 0.5
    mid = float(np.median(pred.score))
    over = ens.predict(x, threshold=mid)
    assert over.threshold == mid
    np.testing.assert_array_equal(over.flagged, pred.score >= mid)
    assert 0 < over.flagged.sum() < 16
    assert ens.predict(x, threshold=0.0).flagged.all()


def test_uncertainty_zero_for_identical_members() -> None:
    model = tiny(0)
    same = make_ensemble([model, copy.deepcopy(model), copy.deepcopy(model)]).predict(batch())
    np.testing.assert_allclose(same.uncertainty, 0.0, atol=1e-6)
    diff = make_ensemble([tiny(0), tiny(1)]).predict(batch())
    member_scores = diff.member_probs[:, :, 2]
    np.testing.assert_allclose(diff.uncertainty, member_scores.std(1), atol=1e-6)
    assert (diff.uncertainty > 0).all()
    single = make_ensemble([model]).predict(batch())
    np.testing.assert_array_equal(single.uncertainty, 0.0)


def test_covariate_fusion_applied_per_row() -> None:
    rng = np.random.default_rng(0)
    n = 120
    age = rng.uniform(40, 90, n)
    sex = list(rng.choice(["F", "M"], n))
    y = (age > 70).astype(int) * 2  # normal / osteoporosis by age
    y[:5] = 1
    img = rng.dirichlet([1, 1, 1], n)
    fusion = fit_fusion(img, age, sex, y, CLASSES)
    ens = make_ensemble([tiny(0)], fusion=fusion)
    x = batch(4)
    covs = [Covariates(85.0, "F"), None, Covariates(None, "M"), Covariates(None, None)]
    pred = ens.predict(x, covariates=covs)
    assert pred.covariates_used == ["age,sex", "", "sex", ""]
    image_only = ens.predict(x)
    np.testing.assert_allclose(pred.probs[[1, 3]], image_only.probs[[1, 3]], atol=1e-6)
    assert pred.probs[0, 2] > 0.8  # an 85-year-old is osteoporotic in this synthetic set
    np.testing.assert_allclose(pred.score, pred.probs[:, 2], atol=1e-6)
    np.testing.assert_allclose(
        pred.member_probs, image_only.member_probs
    )  # members stay image-only
    # a package without fusion ignores covariates
    plain = make_ensemble([tiny(0)]).predict(x, covariates=covs)
    assert plain.covariates_used == [""] * 4


def test_thresholds_per_row_follow_how_the_row_was_scored() -> None:
    """Image-only rows use the image-only threshold, fused rows the combined one."""
    rng = np.random.default_rng(1)
    n = 120
    age = rng.uniform(40, 90, n)
    sex = list(rng.choice(["F", "M"], n))
    y = (age > 70).astype(int) * 2
    fusion = fit_fusion(rng.dirichlet([1, 1, 1], n), age, sex, y, CLASSES)
    ens = make_ensemble([tiny(0)], fusion=fusion, threshold=0.1, image_only_threshold=0.9)
    covs = [Covariates(85.0, "F"), None, Covariates(60.0, None)]
    pred = ens.predict(batch(3), covariates=covs)
    np.testing.assert_allclose(pred.thresholds, [0.1, 0.9, 0.1])
    np.testing.assert_array_equal(pred.flagged, pred.score >= pred.thresholds)
    forced = ens.predict(batch(3), covariates=covs, threshold=0.5)
    np.testing.assert_allclose(forced.thresholds, [0.5, 0.5, 0.5])


def test_heatmap_rows_same_prediction_and_none_elsewhere() -> None:
    ens = make_ensemble([tiny(0), tiny(1)], [1.0, 2.0])
    x = batch(5)
    ask = [True, False, True, False, False]
    with_hm = ens.predict(x, heatmaps=ask)
    without = ens.predict(x)
    np.testing.assert_allclose(with_hm.probs, without.probs, atol=1e-5)
    np.testing.assert_allclose(with_hm.member_probs, without.member_probs, atol=1e-5)
    for i, asked in enumerate(ask):
        hm = with_hm.heatmaps[i]
        if asked:
            assert hm is not None and hm.shape == (SIZE, SIZE) and hm.dtype == np.float32
            assert hm.min() >= 0.0 and hm.max() <= 1.0
        else:
            assert hm is None
    every = ens.predict(x, heatmaps=[True] * 5)
    np.testing.assert_allclose(every.probs, without.probs, atol=1e-5)
    np.testing.assert_allclose(every.heatmaps[0], with_hm.heatmaps[0], atol=1e-5)


def test_member_at_other_resolution_and_numpy_input() -> None:
    torch.manual_seed(0)
    specs = [member(input_size=48), member()]
    pkg = ModelPackage(Path("."), manifest(specs), [tiny(0), tiny(1)])
    ens = Ensemble(pkg, "cpu")
    x = batch(3).numpy()
    pred = ens.predict(x, heatmaps=[True, False, False])
    assert pred.probs.shape == (3, 3) and pred.heatmaps[0].shape == (SIZE, SIZE)


def test_bad_inputs() -> None:
    ens = make_ensemble([tiny(0)])
    with pytest.raises(ValueError, match="B, 1, H, W"):
        ens.predict(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint16))
    with pytest.raises(ValueError, match="heatmaps"):
        ens.predict(batch(2), heatmaps=[True])
    with pytest.raises(ValueError, match="covariates"):
        ens.predict(batch(2), covariates=[None])
    with pytest.raises(ValueError, match="positive"):
        make_ensemble([tiny(0)], positive_classes=["fracture"])
    with pytest.raises(ValueError, match="temperatures"):
        make_ensemble([tiny(0)], [0.0])


def test_amp_never_on_cpu() -> None:
    assert resolve_amp(torch.device("cpu"), None) is None
    assert resolve_amp(torch.device("cpu"), True) is None
    assert make_ensemble([tiny(0)]).amp_dtype is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_matches_cpu() -> None:
    models = [tiny(0), tiny(1)]
    x = batch(8)
    cpu = make_ensemble([copy.deepcopy(m) for m in models]).predict(x, heatmaps=[True] * 8)
    specs = [member(), member()]
    pkg = ModelPackage(Path("."), manifest(specs), models)
    gpu = Ensemble(pkg, torch.device("cuda"))
    assert gpu.amp_dtype in (torch.bfloat16, torch.float16)
    pred = gpu.predict(x, heatmaps=[True] * 4 + [False] * 4)
    np.testing.assert_allclose(pred.probs, cpu.probs, atol=3e-2)
    assert all(h is not None and h.min() >= 0 and h.max() <= 1 for h in pred.heatmaps[:4])
    assert pred.heatmaps[4:] == [None] * 4
    fp32 = Ensemble(ModelPackage(Path("."), manifest(specs), models), "cuda", amp=False)
    np.testing.assert_allclose(fp32.predict(x).probs, cpu.probs, atol=1e-4)


def test_saved_package_round_trip(tmp_path: Path) -> None:
    """A real package on disk (fusion stored as JSON in the manifest) scores identically."""
    rng = np.random.default_rng(1)
    n = 80
    age = rng.uniform(40, 90, n)
    sex = list(rng.choice(["F", "M"], n))
    y = np.digitize(age, [60, 75])
    fusion = fit_fusion(rng.dirichlet([1, 1, 1], n), age, sex, y, CLASSES)
    models = [tiny(0), tiny(1)]
    man = manifest([member(1.3), member(0.8)], fusion=fusion)
    save_package(tmp_path / "pkg", man, models)
    loaded = Ensemble(load_package(tmp_path / "pkg"), "cpu")
    fresh = Ensemble(ModelPackage(Path("."), man, models), "cpu")
    x = batch(4)
    covs = [Covariates(80.0, "F"), None, Covariates(50.0, None), None]
    a = loaded.predict(x, covariates=covs, heatmaps=[True, False, True, False])
    b = fresh.predict(x, covariates=covs, heatmaps=[True, False, True, False])
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.heatmaps[0], b.heatmaps[0])
    assert a.covariates_used == ["age,sex", "", "age", ""]


def test_empty_batch_and_mismatched_fusion() -> None:
    ens = make_ensemble([tiny(0)])
    empty = ens.predict(torch.zeros(0, 1, SIZE, SIZE, dtype=torch.uint16), heatmaps=[])
    assert len(empty) == 0 and empty.probs.shape == (0, 3) and empty.member_probs.shape == (0, 1, 3)
    rng = np.random.default_rng(0)
    fusion = fit_fusion(
        rng.dirichlet([1, 1], 40),
        rng.uniform(40, 90, 40),
        ["F"] * 40,
        np.arange(40) % 2,
        ["a", "b"],
    )
    with pytest.raises(ValueError, match="classes"):
        make_ensemble([tiny(0)], fusion=fusion)


def test_heatmaps_for_flagged_rows_in_one_pass() -> None:
    ens = make_ensemble([tiny(0), tiny(1)], [1.0, 2.0])
    x = batch(12)
    plain = ens.predict(x)
    thr = float(np.median(plain.score))
    pred = ens.predict(x, heatmaps="flagged", threshold=thr)
    np.testing.assert_allclose(pred.probs, plain.probs, atol=1e-5)
    assert 0 < pred.flagged.sum() < 12
    assert [h is not None for h in pred.heatmaps] == list(pred.flagged)
    explicit = ens.predict(x, heatmaps=list(pred.flagged), threshold=thr)
    for a, b in zip(pred.heatmaps, explicit.heatmaps, strict=True):
        if a is not None:
            assert a.shape == (SIZE, SIZE)
            np.testing.assert_allclose(a, b, atol=1e-5)
    none = ens.predict(x, heatmaps="flagged", threshold=1.1)
    assert none.heatmaps == [None] * 12
    with pytest.raises(ValueError, match="flagged"):
        ens.predict(x, heatmaps="all")  # type: ignore[arg-type]
    assert all(not m._forward_hooks for model in ens.models for m in model.modules())


def _flipping(models: list[torch.nn.Module], flips: list[bool]) -> Ensemble:
    specs = [replace(member(), test_time_flip=f) for f in flips]
    return Ensemble(ModelPackage(Path("."), manifest(specs), models), torch.device("cpu"))


def test_test_time_flip_averages_each_member_over_the_mirror_image() -> None:
    x = batch()
    plain = make_ensemble([tiny(0), tiny(1)])
    a, b = plain.predict_member_logits(x), plain.predict_member_logits(x.flip(-1))
    assert not torch.allclose(a, b, atol=1e-2)  # the mirror image does score differently
    ens = _flipping([tiny(0), tiny(1)], [True, False])
    got = ens.predict_member_logits(x)
    np.testing.assert_allclose(got[0], (a[0] + b[0]) / 2, atol=1e-5)
    np.testing.assert_allclose(got[1], a[1], atol=1e-6)  # a member without the flag: unchanged
    # Members that flip cannot tell an image from its mirror image.
    both = _flipping([tiny(0), tiny(1)], [True, True])
    p = both.predict(x)
    np.testing.assert_allclose(p.probs, both.predict(x.flip(-1)).probs, atol=1e-5)
    # Rows with a heatmap report the same (flip-averaged) probabilities; the map is computed.
    hm = both.predict(x, heatmaps=[True, False] * 3)
    np.testing.assert_allclose(hm.probs, p.probs, atol=1e-5)
    assert hm.heatmaps[0] is not None and hm.heatmaps[1] is None
    flagged = both.predict(x, heatmaps="flagged")
    np.testing.assert_allclose(flagged.probs, p.probs, atol=1e-5)
