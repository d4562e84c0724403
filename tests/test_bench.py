"""``osteoscan bench``: every stage measured, JSON keys, limiting stage."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from osteoscan.bench import make_synthetic_jpegs, run_bench
from osteoscan.cli import app

KEYS = {"read_ips", "model_ips", "model_heatmap_ips", "end_to_end_ips", "limiting_stage",
        "batch_size", "workers", "device"}  # fmt: skip


def test_run_bench_on_a_package(tiny_package) -> None:
    res = run_bench(model=str(tiny_package()), device="cpu", batch_size=4, workers=0,
                    n_images=8, image_size=96, min_seconds=0.05)  # fmt: skip
    assert set(res) >= KEYS
    for key in ("read_ips", "model_ips", "model_heatmap_ips", "end_to_end_ips"):
        assert res[key] > 0
    assert res["limiting_stage"] in {"read", "model"}
    assert res["n_images"] == 8 and res["device"] == "cpu" and res["synthetic"]
    assert res["trunk_graph"] is False  # tiny_cnn has no forward_features: the eager model ran


def test_cli_bench_json_with_paths(tmp_path: Path) -> None:
    make_synthetic_jpegs(tmp_path / "img", 6, size=80)
    res = CliRunner().invoke(app, [
        "bench", str(tmp_path / "img"), "--arch", "tiny_cnn", "--model-size", "48", "--json",
        "--batch-size", "3", "--workers", "0", "--seconds", "0.05", "--device", "cpu",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert set(data) >= KEYS and data["n_images"] == 6 and data["model_input_size"] == 48
