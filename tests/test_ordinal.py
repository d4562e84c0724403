"""Ordered grades: the adjacent-category ordinal head, QWK and MAE in evaluate and the card."""

from __future__ import annotations

import csv as csv_module
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from osteoscan.archs import create_model, final_linear
from osteoscan.grades import predict_classes
from osteoscan.metrics import classification_metrics
from osteoscan.testing.synthetic import synthetic_knee, write_png
from osteoscan.train.objectives import OrdinalObjective, SoftOrdinalObjective
from tests.conftest import run_main as _main

DENSITY = {"0": 1.1, "1": 0.9, "2": 0.7, "3": 0.5, "4": 0.3}


def test_ordinal_head_is_rank_one_while_training_and_plain_after() -> None:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 5)
    obj = OrdinalObjective(5, [2, 3, 4])
    obj.prepare(model, "tiny_cnn")
    _, layer = final_linear(model, "tiny_cnn")
    w = layer.weight.detach()
    assert torch.allclose(w, torch.arange(5.0)[:, None] * w[1:2])  # W[k] = k w
    x = torch.randn(4, 3, 32, 32)
    before = model.eval()(x).detach()
    obj.finish(model, "tiny_cnn", np.zeros((0, 5), np.float32), np.zeros(0))
    assert "classifier.1.weight" in model.state_dict()  # an ordinary nn.Linear again
    assert torch.allclose(model(x).detach(), before, atol=1e-6)
    # Adjacent log-odds differ between images by the same amount at every grade step.
    d = (before[:, 1:] - before[:, :-1]).numpy()
    assert np.allclose(d - d[:, :1], (d - d[:, :1])[0:1], atol=1e-5)


def test_soft_ordinal_labels_charge_far_grades_more_than_near_ones() -> None:
    obj = SoftOrdinalObjective(5, [2, 3, 4])
    q = obj.soft.numpy()
    assert np.allclose(q.sum(axis=1), 1.0) and (q.argmax(axis=1) == np.arange(5)).all()
    assert q[2, 1] == pytest.approx(q[2, 3]) and q[2, 1] > q[2, 0] == pytest.approx(q[2, 4])
    # One image of grade 2: a confident "grade 1" costs less than a confident "grade 0", and
    # predicting the soft target itself is the minimum (its cross-entropy is the entropy).
    y = torch.tensor([2])
    sure = {g: torch.full((1, 5), -6.0).index_fill_(1, torch.tensor([g]), 6.0) for g in range(5)}
    cost = {g: float(obj.loss(sure[g], y, None)) for g in range(5)}
    assert cost[1] == pytest.approx(cost[3]) and cost[0] == pytest.approx(cost[4])
    assert cost[2] < cost[1] < cost[0]
    best = float(obj.loss(torch.log(obj.soft[2:3]), y, None))
    assert best == pytest.approx(float(-(obj.soft[2] * torch.log(obj.soft[2])).sum()), abs=1e-6)
    assert best < cost[2]
    # Class weights weigh images, as in plain cross-entropy.
    out, ys = torch.randn(6, 5), torch.tensor([0, 0, 0, 0, 0, 4])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])
    per = [float(obj.loss(out[i : i + 1], ys[i : i + 1], None)) for i in range(6)]
    expected = (sum(per[:5]) + 5 * per[5]) / 10
    assert float(obj.loss(out, ys, w)) == pytest.approx(expected, rel=1e-5)


def test_ordinal_head_needs_ordinal_and_a_known_name() -> None:
    from osteoscan.errors import UsageError
    from osteoscan.train.recipe import make_config

    assert make_config("quick", ordinal=True, ordinal_head="soft").ordinal_head == "soft"
    with pytest.raises(UsageError, match="add --ordinal"):
        make_config("quick", ordinal_head="soft")
    with pytest.raises(UsageError, match="adjacent, soft"):
        make_config("quick", ordinal=True, ordinal_head="corn")


def test_qwk_and_mae_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.clip(y + rng.integers(-1, 2, 300), 0, 4)
    probs = np.full((300, 5), 0.01)
    probs[np.arange(300), pred] = 0.96
    m = classification_metrics(y, probs, list("01234"), ["2", "3", "4"], 0.5, n_boot=200,
                               ordinal=True)  # fmt: skip
    assert m["qwk"]["value"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["mae"]["value"] == pytest.approx(np.abs(y - pred).mean())
    lo, hi = m["qwk"]["ci95"]
    assert lo < m["qwk"]["value"] < hi
    assert "qwk" not in classification_metrics(y, probs, list("01234"), ["4"], 0.5, n_boot=0)


@pytest.mark.parametrize("head", ["adjacent", "soft"])
def test_train_ordinal_grades_and_evaluate_reports_qwk_mae(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], head: str
) -> None:
    rows = ["path,label,group"]
    for g, density in DENSITY.items():
        for i in range(8):
            name = f"img/{g}_{i}.png"
            write_png(tmp_path / name, synthetic_knee(48, seed=30 * int(g) + i, density=density))
            rows.append(f"{name},{g},p{g}{i}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "ordinal"
    code, text = _main([
        "train", "--data", str(csv), "--out", str(out), "--arch", "tiny_cnn", "--random-init",
        "--preset", "quick", "--size", "32", "--epochs", "3", "--batch-size", "8", "--quiet",
        "--classes", "0,1,2,3,4", "--positive", "2,3,4", "--ordinal", "--ordinal-head", head,
    ], capsys)  # fmt: skip
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["target"]
    keys = {"kind", "grade_cutoffs"} | ({"head"} if head == "soft" else set())
    assert target["kind"] == "ordinal" and set(target) == keys
    cuts = target["grade_cutoffs"]
    assert len(cuts) == 4 and cuts == sorted(cuts)
    held = manifest["metrics"]["image_only"]
    assert {"qwk", "mae"} <= set(held) and held["mae"]["value"] is not None
    card = (out / "card.md").read_text()
    assert "quadratic weighted kappa" in card and "Training speed" in card
    assert "img/s" in text  # per-epoch throughput in the log

    report = tmp_path / "r.json"
    code, text = _main(["evaluate", "--data", str(csv), "--model", str(out), "--out",
                        str(report), "--quiet", "--bootstrap", "50"], capsys)  # fmt: skip
    assert code == 0, text
    r = json.loads(report.read_text())
    for key in ("accuracy", "roc_auc", "n", "qwk", "mae"):
        assert set(r[key]) >= {"value", "ci95"} if key != "n" else isinstance(r[key], int)
    assert -1.0 <= r["qwk"]["value"] <= 1.0 and 0.0 <= r["mae"]["value"] <= 4.0
    assert r["prediction_rule"] == "grade_cutoffs"

    # scan reports the same grade rule: each row's prediction is its expected grade read
    # through the package's cut-offs, not the most probable class.
    results = tmp_path / "scan.csv"
    code, text = _main(["scan", str(tmp_path / "img"), "--model", str(out), "--out",
                        str(results), "--quiet", "--body-part", "knee"], capsys)  # fmt: skip
    assert code in (0, 1), text
    scanned = [r for r in csv_module.DictReader(results.open()) if r["status"] == "ok"]
    assert scanned
    probs = np.array([[float(r[f"p_{g}"]) for g in "01234"] for r in scanned])
    assert [r["prediction"] for r in scanned] == [str(k) for k in predict_classes(probs, cuts)]
