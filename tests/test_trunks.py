"""Shared trunks: probe heads on one backbone run it once, store it once, and score as before."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from osteoscan.archs import create_model, get_arch, get_module
from osteoscan.ensemble import Ensemble
from osteoscan.errors import ModelIntegrityError
from osteoscan.gradcam import cam_from_forward, forward_for_cam, fuse_cams
from osteoscan.hashing import file_sha256
from osteoscan.manifest import MANIFEST, Manifest, MemberSpec, package_identity, read_manifest
from osteoscan.package import ModelPackage, load_package, save_package, verify_package
from osteoscan.preprocess import to_model_input
from osteoscan.trunks import head_module, trunk_digest

CLASSES = ["normal", "osteopenia", "osteoporosis"]
SIZE = 32
TEMPS = [1.0, 1.7, 0.6, 2.5]


def _backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 3)
    model.train()
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        model(torch.rand(8, 3, SIZE, SIZE))
    return model.eval()


def _probe(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``base``'s trunk (a copy, byte-identical) with a fresh, sharpened head."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    head = model.classifier[-1]
    head.reset_parameters()
    with torch.no_grad():
        head.weight.mul_(20.0)
    return model.eval()


def _members() -> list[torch.nn.Module]:
    """Members 0, 1, 3: probes on one trunk; member 2: a trunk of its own (a fine-tuned fold)."""
    base = _backbone(0)
    return [_probe(base, 10), _probe(base, 11), _probe(_backbone(1), 12), _probe(base, 13)]


def _manifest(n: int, **kw: Any) -> Manifest:
    specs = [MemberSpec.for_arch("tiny_cnn", input_size=SIZE, temperature=t) for t in TEMPS[:n]]
    base: dict[str, Any] = dict(
        name="probe-test", version="1", classes=CLASSES, positive_classes=["osteoporosis"],
        threshold=0.3, body_parts=["knee"], preprocess={"size": SIZE}, members=specs,
    )  # fmt: skip
    return Manifest(**{**base, **kw})


def _ensemble(models: list[torch.nn.Module], **kw: Any) -> Ensemble:
    return Ensemble(ModelPackage(Path("."), _manifest(len(models)), models), "cpu", **kw)


def _batch(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 65536, (n, 1, SIZE, SIZE), generator=g, dtype=torch.int32).to(
        torch.uint16
    )


def test_members_are_grouped_by_their_weights_not_by_any_flag() -> None:
    models = _members()
    assert [g.members for g in _ensemble(models).groups] == [[0, 1, 3], [2]]
    assert [g.members for g in _ensemble(models, share_trunks=False).groups] == [[0], [1], [2], [3]]
    # One running-mean entry apart: no longer the same trunk.
    with torch.no_grad():
        models[3].features[1][1].running_mean[0] += 1e-3
    assert [g.members for g in _ensemble(models).groups] == [[0, 1], [2], [3]]
    # Members fed differently (another input size) never share, whatever their weights.
    specs = [*_manifest(2).members[:1], replace(_manifest(2).members[1], input_size=SIZE * 2)]
    pkg = ModelPackage(Path("."), _manifest(2, members=specs), _members()[:2])
    assert [g.members for g in Ensemble(pkg, "cpu").groups] == [[0], [1]]


def _count_trunk_runs(models: list[torch.nn.Module]) -> list[int]:
    counts = [0] * len(models)
    for i, m in enumerate(models):
        m.features.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_shared_trunk_runs_once_per_batch_and_scores_identically() -> None:
    models = _members()
    shared = _ensemble(models)
    whole = _ensemble(copy.deepcopy(models), share_trunks=False)
    counts = _count_trunk_runs(models)
    x = _batch()
    got, want = shared.predict(x), whole.predict(x)
    assert counts == [1, 0, 1, 0]  # one trunk run per distinct trunk
    # Same trunk weights, same input, same ops: the features (and so every score) are identical.
    np.testing.assert_array_equal(got.member_probs, want.member_probs)
    np.testing.assert_array_equal(got.score, want.score)
    np.testing.assert_array_equal(got.uncertainty, want.uncertainty)
    assert len(set(np.round(got.member_probs[:, [0, 1, 3], 2].std(axis=1), 6))) > 1  # heads differ
    torch.testing.assert_close(
        shared.predict_member_logits(x), whole.predict_member_logits(x), rtol=0, atol=0
    )


def _reference_heatmaps(models: list[torch.nn.Module], x: torch.Tensor) -> np.ndarray:
    """Fused heatmaps the old way: a separate Grad-CAM forward and backward per member."""
    spec = get_arch("tiny_cnn")
    xin = to_model_input(x, spec.mean, spec.std, channels_last=True)
    raw = []
    for model, t in zip(models, TEMPS, strict=False):
        fw = forward_for_cam(model, get_module(model, spec.cam_layer), xin)
        raw.append(cam_from_forward(fw, [2], t, out_size=(SIZE, SIZE)))
    return fuse_cams(raw).numpy()


def test_fused_heatmaps_equal_the_per_member_computation() -> None:
    models = _members()
    shared = _ensemble(models)
    x = _batch()
    reference = _reference_heatmaps(models, x)
    want = [True, False, True, True, False, True]
    got = shared.predict(x, heatmaps=want)
    for i, asked in enumerate(want):
        if asked:
            np.testing.assert_allclose(got.heatmaps[i], reference[i], rtol=0, atol=1e-5)
        else:
            assert got.heatmaps[i] is None
    assert max(float(np.ptp(h)) for h in got.heatmaps if h is not None) > 0.5  # real maps
    # "flagged": one open forward per group over every row, backward for the flagged ones only.
    flagged = shared.predict(x, heatmaps="flagged", threshold=float(np.median(got.score)))
    assert 0 < flagged.flagged.sum() < len(x)
    for i in range(len(x)):
        if flagged.flagged[i]:
            np.testing.assert_allclose(flagged.heatmaps[i], reference[i], rtol=0, atol=1e-5)
        else:
            assert flagged.heatmaps[i] is None
    # Heatmap rows do not change the scores.
    np.testing.assert_array_equal(got.member_probs, shared.predict(x).member_probs)


def test_one_member_heads_explain_differently() -> None:
    """Per member the shared map differs only through the head's gradient: two probes' maps of
    one image differ, and each equals that member's own Grad-CAM."""
    models = _members()
    x = _batch(2)
    maps = [_reference_heatmaps([m], x)[0] for m in (models[0], models[1])]
    assert np.abs(maps[0] - maps[1]).max() > 1e-3
    for i in (0, 1):
        ens = Ensemble(ModelPackage(Path("."), _manifest(1), [models[i]]), "cpu")
        np.testing.assert_allclose(ens.predict(x, heatmaps=[True, False]).heatmaps[0], maps[i],
                                   atol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------- package


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, list[torch.nn.Module]]:
    models = _members()
    return save_package(tmp_path / "probes", _manifest(4), models), models


def test_a_shared_trunk_is_stored_once_and_loads_bit_identical(saved, tmp_path: Path) -> None:
    path, models = saved
    manifest = read_manifest(path)
    trunks = sorted(p.name for p in path.glob("trunk-*.safetensors"))
    assert len(trunks) == 1 and trunks[0].startswith("trunk-tiny_cnn-")
    names = [m.weights for m in manifest.members]
    assert [m.trunk for m in manifest.members] == [trunks[0], trunks[0], "", trunks[0]]
    assert names[2].startswith("member02-tiny_cnn-") and "head" not in names[2]
    assert all(names[i].startswith(f"member{i:02d}-tiny_cnn-head-") for i in (0, 1, 3))
    whole = save_package(tmp_path / "whole", _manifest(4), models, share_trunks=False)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert size < 0.6 * sum(p.stat().st_size for p in whole.glob("*.safetensors"))
    # Member 2 (own trunk) is written exactly as before shared trunks existed.
    assert manifest.members[2].sha256 == read_manifest(whole).members[2].sha256
    pkg = load_package(path)
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        for original, loaded in zip(models, pkg.members, strict=True):
            assert torch.equal(original(x), loaded(x))
    assert [g.members for g in Ensemble(pkg, "cpu").groups] == [[0, 1, 3], [2]]
    assert len(verify_package(path)) == 5  # four member files, then the trunk once


def test_a_package_saved_before_shared_trunks_still_loads(saved, tmp_path: Path) -> None:
    """Schema 2, every member whole, no trunk keys: loads, shares its trunk in memory, and
    scores exactly like the same members saved with a shared trunk file."""
    path, models = saved
    old = save_package(tmp_path / "old", _manifest(4), models, share_trunks=False)
    data = json.loads((old / MANIFEST).read_text())
    data["schema_version"] = 2
    for m in data["members"]:
        del m["trunk"], m["trunk_sha256"]
    (old / MANIFEST).write_text(json.dumps(data))
    assert not list(old.glob("trunk-*"))
    ens_old, ens_new = Ensemble(load_package(old), "cpu"), Ensemble(load_package(path), "cpu")
    assert [g.members for g in ens_old.groups] == [[0, 1, 3], [2]]
    x = _batch()
    np.testing.assert_array_equal(ens_old.predict(x).score, ens_new.predict(x).score)
    # The stored form is part of the identity: re-saving shared rescans once.
    assert package_identity(read_manifest(old)) != package_identity(read_manifest(path))


def test_identity_covers_the_trunk(saved, tmp_path: Path) -> None:
    path, models = saved
    with torch.no_grad():
        for i in (0, 1, 3):
            models[i].features[0][0].weight[0, 0, 0, 0] += 0.5  # a new shared trunk, same heads
    other = save_package(tmp_path / "other", _manifest(4), models)
    a, b = read_manifest(path), read_manifest(other)
    assert [m.sha256 for m in a.members] == [m.sha256 for m in b.members]  # heads unchanged
    assert package_identity(a) != package_identity(b)


def test_tampered_or_missing_trunk_is_refused(saved) -> None:
    path, _ = saved
    trunk = path / read_manifest(path).members[0].trunk
    data = bytearray(trunk.read_bytes())
    data[-5] ^= 0x01
    trunk.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=trunk.name) as err:
        load_package(path)
    assert "sha256" in str(err.value)
    trunk.unlink()
    with pytest.raises(ModelIntegrityError, match=f"{trunk.name} is missing"):
        load_package(path)


class _Payload:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def _rewrite(path: Path, manifest: Manifest, **member0: Any) -> None:
    members = [replace(manifest.members[0], **member0), *manifest.members[1:]]
    (path / MANIFEST).write_text(json.dumps(replace(manifest, members=members).to_dict()))


def test_trunk_files_are_never_unpickled_nor_allowed_to_clash(saved, tmp_path: Path) -> None:
    path, _ = saved
    manifest = read_manifest(path)
    _Payload.marker = str(tmp_path / "code-ran")
    evil = path / "trunk-tiny_cnn-evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": _Payload()}))
    _rewrite(path, manifest, trunk=evil.name, trunk_sha256=file_sha256(evil))
    with pytest.raises(ModelIntegrityError, match="not a valid safetensors"):
        load_package(path)
    assert not Path(_Payload.marker).exists()
    _rewrite(path, manifest, trunk="../trunk.safetensors")
    with pytest.raises(ModelIntegrityError, match="plain file name"):
        load_package(path)
    # A head file that also carries trunk tensors (here: a whole member's file) is refused.
    whole = manifest.members[2]
    _rewrite(path, manifest, weights=whole.weights, sha256=whole.sha256)
    with pytest.raises(ModelIntegrityError, match="both hold"):
        load_package(path)
    # One trunk file listed with two hashes is refused before anything is read.
    _rewrite(path, manifest, trunk_sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="different sha256"):
        verify_package(path)


def test_resaving_replaces_trunk_files(saved) -> None:
    path, models = saved
    first = read_manifest(path)
    save_package(path, _manifest(4), models)
    assert read_manifest(path).members == first.members  # deterministic
    save_package(path, _manifest(4), models, share_trunks=False)
    assert not list(path.glob("trunk-*")) and len(list(path.glob("*.safetensors"))) == 4
    load_package(path)


def test_heads_and_digests_follow_the_registry() -> None:
    model = _backbone(0)
    assert head_module(model, "tiny_cnn") is model.classifier
    twin = _probe(model, 5)
    assert trunk_digest(twin, "tiny_cnn") == trunk_digest(model, "tiny_cnn")
    assert trunk_digest(twin.to(memory_format=torch.channels_last), "tiny_cnn") == trunk_digest(
        model, "tiny_cnn"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_trunk_on_cuda_under_autocast() -> None:
    models = _members()
    x, want = _batch(), [True, False] * 3
    copies = copy.deepcopy(models)  # Ensemble moves its models in place
    whole = Ensemble(ModelPackage(Path("."), _manifest(4), copies), "cuda", share_trunks=False)
    shared = Ensemble(ModelPackage(Path("."), _manifest(4), models), "cuda")
    assert shared.amp_dtype is not None and [g.members for g in shared.groups] == [[0, 1, 3], [2]]
    a, b = shared.predict(x, heatmaps=want), whole.predict(x, heatmaps=want)
    np.testing.assert_allclose(a.member_probs, b.member_probs, rtol=0, atol=1e-6)
    for got, ref, asked in zip(a.heatmaps, b.heatmaps, want, strict=True):
        assert (got is not None) == asked
        if got is not None:
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
