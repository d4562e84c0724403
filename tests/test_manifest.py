"""Manifests without torch: the same objects through osteoscan.package, same constants."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import osteoscan.manifest as manifest_mod
import osteoscan.package as package_mod
from osteoscan.errors import ModelIntegrityError


def test_reading_a_package_identity_imports_no_torch(tiny_package) -> None:
    pkg = tiny_package()
    code = (
        "import sys\n"
        "from osteoscan.package import package_identity, read_manifest, resolve_package\n"
        f"print(package_identity(read_manifest(resolve_package({str(pkg)!r}))))\n"
        "assert 'torch' not in sys.modules and 'cv2' not in sys.modules, 'heavy import'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = package_mod.package_identity(package_mod.load_package(pkg).manifest)
    assert proc.stdout.strip() == expected


def test_package_re_exports_the_manifest_api() -> None:
    for name in ("Manifest", "MemberSpec", "ModelNotFoundError", "read_manifest",
                 "resolve_package", "list_packages", "search_dirs", "package_identity",
                 "DEFAULT_MODEL", "MANIFEST", "ENV_MODELS", "SCHEMA_VERSION"):  # fmt: skip
        assert getattr(package_mod, name) is getattr(manifest_mod, name), name


def test_member_specs_take_size_and_normalisation_from_the_registry() -> None:
    from osteoscan.archs import get_arch
    from osteoscan.constants import IMAGENET_MEAN

    spec = manifest_mod.MemberSpec.for_arch("tiny_cnn")  # registry values, lazily imported
    arch = get_arch("tiny_cnn")
    assert (spec.input_size, spec.mean, spec.std) == (arch.default_size, arch.mean, arch.std)
    assert manifest_mod.MemberSpec("x").mean == IMAGENET_MEAN


def test_the_default_model_is_found_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./models here
    monkeypatch.delenv(manifest_mod.ENV_MODELS, raising=False)
    bundled = manifest_mod.bundled_models_dir()
    assert bundled is not None and bundled in manifest_mod.search_dirs()
    found = manifest_mod.resolve_package(None)
    assert found == bundled / manifest_mod.DEFAULT_MODEL
    assert manifest_mod.read_manifest(found).name == manifest_mod.DEFAULT_MODEL


def _schema_1(tiny_package) -> dict:
    """A package manifest as schema 1 wrote it: per-variant thresholds inside ``fusion``."""
    data = json.loads((tiny_package() / manifest_mod.MANIFEST).read_text())
    data.update(schema_version=1, threshold=0.4)
    per_variant = {"image_only": 0.25, "combined": 0.4}
    data["fusion"] = {"format": "osteoscan-fusion/1", "thresholds": per_variant}
    return data


def test_schema_1_thresholds_become_typed_fields(tiny_package) -> None:
    old = manifest_mod.Manifest.from_dict(_schema_1(tiny_package))
    assert old.threshold == 0.4 and old.image_only_threshold == 0.25
    assert old.fusion == {"format": "osteoscan-fusion/1"}  # the key left the fusion dict
    assert old.threshold_for(fused=False) == 0.25 and old.threshold_for(fused=True) == 0.4
    written = old.to_dict()
    # Written as schema 3, the oldest that holds it: older osteoscan versions still read it.
    assert written["schema_version"] == 3 and manifest_mod.SCHEMA_VERSION == 4
    assert written["image_only_threshold"] == 0.25 and "thresholds" not in written["fusion"]
    new = manifest_mod.Manifest.from_dict(written)
    assert new.to_dict() == written and new.schema_version == 3 and old.schema_version == 1
    # A package keeps its identity across the schema change: nightly scans do not rescore.
    assert manifest_mod.package_identity(new) == manifest_mod.package_identity(old)
    moved = replace(new, image_only_threshold=0.3)
    assert manifest_mod.package_identity(moved) != manifest_mod.package_identity(new)


def test_one_threshold_serves_every_row_without_an_image_only_one(tiny_package) -> None:
    m = manifest_mod.read_manifest(tiny_package())
    assert m.image_only_threshold is None
    assert m.threshold_for(fused=False) == m.threshold_for(fused=True) == m.threshold
    with pytest.raises(ModelIntegrityError, match="image_only_threshold 1.5 outside"):
        replace(m, image_only_threshold=1.5).validate()


def test_members_that_flip_at_test_time_need_schema_4(tiny_package) -> None:
    m = manifest_mod.read_manifest(tiny_package())
    plain = m.to_dict()
    assert plain["schema_version"] == 3
    assert all("test_time_flip" not in s for s in plain["members"])
    flip = replace(m, members=[replace(m.members[0], test_time_flip=True), *m.members[1:]])
    written = flip.to_dict()
    assert written["schema_version"] == 4
    assert [s.get("test_time_flip", False) for s in written["members"]] == [True, False]
    back = manifest_mod.Manifest.from_dict(written)
    assert back.members[0].test_time_flip and not back.members[1].test_time_flip
    # Flipping changes every score: a nightly scan must not reuse the unflipped package's rows.
    assert manifest_mod.package_identity(flip) != manifest_mod.package_identity(m)
    assert manifest_mod.package_identity(back) == manifest_mod.package_identity(flip)
