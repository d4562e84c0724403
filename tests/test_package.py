"""Model packages: save → load is bit-identical, tampering and pickles are refused, lookup works."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from osteoscan.archs import create_model
from osteoscan.errors import ModelIntegrityError
from osteoscan.package import (
    DEFAULT_MODEL,
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    MemberSpec,
    ModelNotFoundError,
    list_packages,
    load_package,
    package_identity,
    read_manifest,
    resolve_package,
    save_package,
)

CLASSES = ["normal", "osteopenia", "osteoporosis"]


def _manifest(n_members: int = 2, **kw) -> Manifest:
    members = [MemberSpec.for_arch("tiny_cnn", fold=i, temperature=1.5) for i in range(n_members)]
    base = dict(
        name="knee-test",
        version="1.2.0",
        classes=CLASSES,
        positive_classes=["osteoporosis"],
        threshold=0.31,
        target_sensitivity=0.9,
        body_parts=["knee"],
        preprocess={"size": 64, "resize": "letterbox"},
        covariates=["age", "sex"],
        members=members,
        fusion={"kind": "logistic", "subsets": {}},
        training_data={"n_images": 10, "n_duplicate_groups": 2, "n_conflicting_groups": 1},
        metrics={"roc_auc": {"value": 0.8, "ci95": [0.7, 0.9]}},
        command="osteoscan train --data x --out y",
    )
    base.update(kw)
    return Manifest(**base)


def _models(n: int = 2) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    models = [create_model("tiny_cnn", num_classes=3) for _ in range(n)]
    for m in models:  # non-trivial batch-norm statistics, as after training
        m.train()
        with torch.no_grad():
            m(torch.rand(8, 3, 64, 64))
    return [m.eval() for m in models]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, list[torch.nn.Module]]:
    """A two-member tiny_cnn package in tmp_path/models/knee-test and the models saved in it."""
    models = _models()
    out = save_package(
        tmp_path / "models" / "knee-test",
        _manifest(),
        models,
        card="# Model card\nNot for clinical use.\n",
        report={"roc.png": b"\x89PNG fake", "split.json": b"{}"},
    )
    return out, models


def test_save_load_bit_identical(saved) -> None:
    path, models = saved
    names = sorted(p.name for p in path.iterdir())
    assert names[:2] == ["card.md", MANIFEST] and names[-1] == "report"
    assert all(n.endswith(".safetensors") for n in names[2:4])
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*"))
    pkg = load_package(path)
    assert len(pkg.members) == 2 and all(not m.training for m in pkg.members)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        for original, loaded in zip(models, pkg.members, strict=True):
            assert torch.equal(original(x), loaded(x))
    m = pkg.manifest
    assert m.members[0].sha256 and m.members[0].weights.startswith("member00-tiny_cnn-")
    # No member flips at test time: written as schema 3, the oldest that holds the package.
    assert m.created_at and m.osteoscan_version and m.schema_version == 3 < SCHEMA_VERSION
    assert (path / "report" / "roc.png").read_bytes() == b"\x89PNG fake"


def test_saving_is_deterministic_and_resaving_replaces(saved) -> None:
    path, models = saved
    first = read_manifest(path)
    save_package(path, _manifest(), models)
    second = read_manifest(path)
    # Identical weights, identical files: safetensors metadata order must not vary.
    assert [m.sha256 for m in first.members] == [m.sha256 for m in second.members]
    assert package_identity(first) == package_identity(second)
    models[1].classifier[1].bias.data += 1
    save_package(path, _manifest(), models)
    third = read_manifest(path)
    assert third.members[1].sha256 != first.members[1].sha256
    assert package_identity(third) != package_identity(first)
    # The stale member file of the previous save is gone; the package still loads.
    assert sorted(p.name for p in path.glob("*.safetensors")) == sorted(
        m.weights for m in third.members
    )
    load_package(path)


def test_float16_storage(tmp_path: Path) -> None:
    models = _models(1)
    path = save_package(tmp_path / "half", _manifest(1), models, dtype="float16")
    pkg = load_package(path)
    assert pkg.manifest.members[0].dtype == "float16"
    assert all(p.dtype == torch.float32 for p in pkg.members[0].parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(models[0](x), pkg.members[0](x), atol=1e-2)


def test_tampered_weights_are_refused(saved) -> None:
    path, _ = saved
    weights = path / read_manifest(path).members[1].weights
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=weights.name) as err:
        load_package(path)
    assert "sha256" in str(err.value)
    weights.unlink()
    with pytest.raises(ModelIntegrityError, match=f"{weights.name} is missing"):
        load_package(path)


class _Payload:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickle_disguised_as_safetensors_is_never_unpickled(saved, tmp_path: Path) -> None:
    path, _ = saved
    _Payload.marker = str(tmp_path / "code-ran")
    manifest = read_manifest(path)
    evil = path / "member00-tiny_cnn-evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": _Payload()}))
    # Even with the manifest rewritten to match the pickle's hash, it must not load.
    from osteoscan.hashing import file_sha256

    member = replace(manifest.members[0], weights=evil.name, sha256=file_sha256(evil))
    doctored = replace(manifest, members=[member, *manifest.members[1:]])
    (path / MANIFEST).write_text(json.dumps(doctored.to_dict()))
    with pytest.raises(ModelIntegrityError, match="not a valid safetensors"):
        load_package(path)
    assert not Path(_Payload.marker).exists()
    # A .pth member is refused by name, before any read.
    member = replace(member, weights="member00.pth")
    (path / MANIFEST).write_text(json.dumps(replace(doctored, members=[member]).to_dict()))
    with pytest.raises(ModelIntegrityError, match="only .safetensors"):
        load_package(path)
    member = replace(member, weights="../outside.safetensors")
    (path / MANIFEST).write_text(json.dumps(replace(doctored, members=[member]).to_dict()))
    with pytest.raises(ModelIntegrityError, match="plain file name"):
        load_package(path)


def test_weights_of_another_arch_are_refused(saved) -> None:
    path, _ = saved
    manifest = read_manifest(path)
    member = replace(manifest.members[0], arch="efficientnet_lite0")
    (path / MANIFEST).write_text(json.dumps(replace(manifest, members=[member]).to_dict()))
    with pytest.raises(ModelIntegrityError, match="does not fit architecture"):
        load_package(path)


def test_manifest_round_trip_and_validation() -> None:
    manifest = _manifest()
    data = manifest.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Manifest.from_dict(data) == manifest
    assert data["members"][0]["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(ModelIntegrityError, match="unknown manifest key"):
        Manifest.from_dict({**data, "thresold": 0.2})
    with pytest.raises(ModelIntegrityError, match="newer"):
        Manifest.from_dict({**data, "schema_version": 99})
    with pytest.raises(ModelIntegrityError, match="positive_classes"):
        _manifest(positive_classes=["fracture"]).validate()
    with pytest.raises(ModelIntegrityError, match="threshold"):
        _manifest(threshold=1.5).validate()
    lite = MemberSpec.for_arch("efficientnet_lite1")
    assert lite.input_size == 240 and lite.mean == (0.498, 0.498, 0.498)


def test_unreadable_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="not valid JSON"):
        load_package(bad)
    with pytest.raises(ModelNotFoundError, match="no manifest.json"):
        resolve_package(tmp_path)


def test_resolve_by_name_via_env(saved, tmp_path: Path, monkeypatch) -> None:
    path, _ = saved
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./models here
    monkeypatch.setenv("OSTEOSCAN_MODELS", str(path.parent))
    assert resolve_package("knee-test") == path
    assert resolve_package(path / MANIFEST) == path
    assert resolve_package(str(path)) == path
    # The env folder comes first; the repository's bundled models/ may follow it.
    assert [p for p, _ in list_packages()][0] == path
    # Also found by its manifest name when the folder is named differently.
    (path.parent / "knee-test").rename(path.parent / "renamed")
    assert resolve_package("knee-test") == path.parent / "renamed"
    with pytest.raises(ModelNotFoundError, match="'nope' not found"):
        resolve_package("nope")
    # With the repository's bundled models/ out of the search path, no default is found.
    import osteoscan.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "search_dirs", lambda: [path.parent])
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL):
        resolve_package(None)


def test_identity_ignores_timestamps_not_outputs() -> None:
    a = _manifest()
    assert package_identity(a) == package_identity(replace(a, created_at="x", metrics={}))
    assert package_identity(a) != package_identity(replace(a, threshold=0.4))
    assert package_identity(a) != package_identity(replace(a, preprocess={"size": 96}))
    assert len(package_identity(a)) == 32


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="models for"):
        save_package(tmp_path / "x", _manifest(2), _models(1))
    with pytest.raises(ValueError, match="escapes"):
        save_package(tmp_path / "y", _manifest(1), _models(1), report={"../evil": b""})
