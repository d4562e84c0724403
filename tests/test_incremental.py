"""IncrementalRun: the run key comes from manifests alone, and loaded models must match it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from osteoscan.errors import OsteoscanError
from osteoscan.manifest import read_manifest
from osteoscan.scan.incremental import IncrementalRun
from osteoscan.scan.pipeline import ScanConfig


def test_key_from_manifests_and_models_must_match(tiny_package, tmp_path: Path) -> None:
    cfg = ScanConfig(paths=[tmp_path], out=tmp_path / "r.csv")
    same = SimpleNamespace(manifest=read_manifest(tiny_package()).to_dict())
    other = SimpleNamespace(manifest=read_manifest(tiny_package(seed=1)).to_dict())
    run = IncrementalRun.start(cfg)
    try:
        run.bind_manifests([read_manifest(tiny_package())])
        key = run.key
        with pytest.raises(OsteoscanError, match="changed"):
            run.use_models([other])  # package replaced after planning: refuse, score nothing
        run.use_models([same])
        assert run.key == key and run.models == [same]
        assert not run.outputs_current()  # nothing exported yet
    finally:
        run.close()
