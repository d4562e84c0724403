"""T-score models: regression on T-scores, WHO category probabilities, evaluate and scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from osteoscan.testing.synthetic import synthetic_knee, write_png
from osteoscan.train.data import who_category
from osteoscan.train.tscore import tscore_from_probs, tscore_logits
from tests.conftest import run_main as _main


def _density(t: float) -> float:
    """Synthetic bone density that drives the T-score: 0.3 at T = -4, 1.1 at T = +1."""
    return 0.3 + 0.8 * (t + 4.0) / 5.0


def _dataset(root: Path, n: int = 60, size: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["path,tscore,group"]
    for i, t in enumerate(rng.uniform(-4.0, 1.0, n)):
        name = f"img/k{i}.png"
        write_png(root / name, synthetic_knee(size, seed=500 + i, density=_density(float(t))))
        rows.append(f"{name},{t:.2f},p{i}")
    (root / "tscores.csv").write_text("\n".join(rows) + "\n")
    return root / "tscores.csv"


def test_who_categories_and_exact_inversion() -> None:
    assert [who_category(t) for t in (-3.0, -2.5, -2.49, -1.01, -1.0, 0.5)] == [
        "osteoporosis", "osteoporosis", "osteopenia", "osteopenia", "normal", "normal",
    ]  # fmt: skip
    mu = np.array([-6.0, -2.5, -1.7, -1.0, 0.0, 3.0])
    for tau in (0.2, 0.7):
        z = tscore_logits(mu, tau)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        # At a WHO cut-off its two neighbouring categories are equally likely.
        assert p[1, 1] == pytest.approx(p[1, 2]) and p[3, 0] == pytest.approx(p[3, 1])
        got = tscore_from_probs(p.astype(np.float32)[:, None, :], [tau])
        assert np.allclose(got, mu, atol=1e-3)


def test_tscore_model_trains_evaluates_and_scans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = _dataset(tmp_path / "train")
    out = tmp_path / "tmodel"
    code, text = _main([
        "train", "--data", str(csv), "--out", str(out), "--arch", "tiny_cnn", "--random-init",
        "--preset", "quick", "--size", "48", "--epochs", "12", "--stage1-epochs", "0",
        "--lr", "0.01", "--batch-size", "8", "--quiet", "--target", "tscore", "--seed", "2",
    ], capsys)  # fmt: skip
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["normal", "osteopenia", "osteoporosis"]
    assert manifest["positive_classes"] == ["osteoporosis"]
    target = manifest["target"]
    assert target["kind"] == "tscore" and target["cutoffs"] == [-1.0, -2.5]
    assert len(target["scale"]) == 1 and target["scale"][0] > 0
    held = manifest["metrics"]["image_only"]["tscore"]
    card = (out / "card.md").read_text()
    assert "T-score MAE" in card and "ROC-AUC of predicted T, T <= -2.5" in card
    assert held["mae"]["value"] is not None

    test_csv = _dataset(tmp_path / "test", n=30, seed=1)
    report = tmp_path / "r.json"
    code, text = _main(["evaluate", "--data", str(test_csv), "--model", str(out), "--out",
                        str(report), "--quiet", "--bootstrap", "100"], capsys)  # fmt: skip
    assert code == 0, text
    r = json.loads(report.read_text())
    ts = r["tscore"]
    assert ts["n"] == 30
    # Density drives the T-score: the model must have learnt it (chance: r ~ 0, MAE ~ 1.7).
    assert ts["pearson_r"]["value"] > 0.5, ts
    assert ts["mae"]["value"] < 1.3, ts
    assert ts["roc_auc"]["osteoporosis"]["value"] > 0.7, ts
    assert set(ts["roc_auc"]["low_bone_mass"]) == {"value", "ci95"}
    assert "T-score MAE" in text

    # scan: the package scores like any other; score = P(osteoporosis).
    from osteoscan.ensemble import Ensemble
    from osteoscan.package import load_package
    from osteoscan.scan.score import predicted_tscores

    pkg = load_package(out)
    imgs = np.stack([np.load(f) for f in []] or [np.zeros((48, 48), np.uint16)])[:, None]
    pred = Ensemble(pkg).predict(imgs)
    assert np.allclose(pred.score, pred.probs[:, 2], atol=1e-6)
    t = predicted_tscores(pkg.manifest, pred.member_probs)
    assert t is not None and t.shape == (1,) and np.isfinite(t).all()
    code, text = _main(["scan", str(tmp_path / "test" / "img"), "--model", str(out), "--out",
                        str(tmp_path / "scan.csv"), "--hdf5", str(tmp_path / "scan.h5"),
                        "--workers", "0", "-q"], capsys)  # fmt: skip
    assert code == 0, text
    # the scan writes each image's predicted T-score; it follows the true one
    import csv as csv_module

    from osteoscan.writers import read_hdf5

    with open(tmp_path / "scan.csv", newline="") as fh:
        scanned = list(csv_module.DictReader(fh))
    truth = {f"k{i}.png": float(line.split(",")[1])
             for i, line in enumerate(test_csv.read_text().splitlines()[1:])}  # fmt: skip
    ok = [r for r in scanned if r["status"] == "ok"]
    assert len(scanned) == 30 and len(ok) >= 20, [r["reason"] for r in scanned]
    assert all(r["tscore"] == "" for r in scanned if r["status"] != "ok")  # unscored: no T
    pairs = [(truth[Path(r["path"]).name], float(r["tscore"])) for r in ok]
    assert np.corrcoef(np.array(pairs).T)[0, 1] > 0.5
    h5 = read_hdf5(tmp_path / "scan.h5")
    assert np.isfinite(h5["tscore"]).all() and len(h5["tscore"]) == len(ok)
