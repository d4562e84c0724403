"""Manifests without torch: the same objects through osteoscan.package, same constants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import osteoscan.manifest as manifest_mod
import osteoscan.package as package_mod


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


def test_imagenet_constants_match_preprocess() -> None:
    from osteoscan.preprocess import IMAGENET_MEAN, IMAGENET_STD

    assert manifest_mod.IMAGENET_MEAN == IMAGENET_MEAN
    assert manifest_mod.IMAGENET_STD == IMAGENET_STD
    spec = manifest_mod.MemberSpec.for_arch("tiny_cnn")  # registry values, lazily imported
    assert spec.input_size > 0 and Path(manifest_mod.MANIFEST).suffix == ".json"


def test_the_default_model_is_found_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./models here
    monkeypatch.delenv(manifest_mod.ENV_MODELS, raising=False)
    bundled = manifest_mod.bundled_models_dir()
    assert bundled is not None and bundled in manifest_mod.search_dirs()
    found = manifest_mod.resolve_package(None)
    assert found == bundled / manifest_mod.DEFAULT_MODEL
    assert manifest_mod.read_manifest(found).name == manifest_mod.DEFAULT_MODEL
