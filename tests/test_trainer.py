"""End-to-end tests for osteoscan.train.trainer on small synthetic knee folders (seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from osteoscan.ensemble import Ensemble
from osteoscan.package import Manifest, load_package
from osteoscan.testing.synthetic import synthetic_knee, write_png
from osteoscan.train.recipe import make_config
from osteoscan.train.trainer import train, train_models

DENSITY = {"normal": 1.0, "osteopenia": 0.65, "osteoporosis": 0.3}
AGE = {"normal": 45.0, "osteopenia": 58.0, "osteoporosis": 72.0}


def make_dataset(root: Path, per_class: int = 12, size: int = 96) -> Path:
    """Class folders of synthetic knees + covariates.csv; one cross-class duplicate file."""
    rows = ["path,age,sex"]
    for c, (label, density) in enumerate(DENSITY.items()):
        for i in range(per_class):
            name = f"{label[:7]}{i}"
            img = synthetic_knee(size, seed=100 * c + i, density=density)
            write_png(root / label / f"{name}.png", img)
            sex = "F" if (i + c) % 3 else "M"
            rows.append(f"{name},{AGE[label] + (i % 4) * 2 - 3},{sex}")
    # The same bytes under two labels: a conflicting duplicate group that must be dropped.
    shutil.copy(root / "normal" / "normal0.png", root / "osteopenia" / "dup.png")
    rows.append("dup,50,F")
    (root / "covariates.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("knees"))


def _cfg(dataset: Path, out: Path | None = None, **over):
    base = {
        "data": dataset, "out": out, "archs": ("tiny_cnn",), "random_init": True, "size": 64,
        "epochs": 3, "stage1_epochs": 0, "lr": 1e-2, "batch_size": 8, "n_boot": 50,
        "covariates_csv": dataset / "covariates.csv", "name": "test-knee", "read_workers": 1,
    }  # fmt: skip
    base.update(over)
    return make_config(None, **base)


def test_train_writes_valid_package_that_reloads_bit_identical(dataset: Path, tmp_path: Path):
    events = []
    # A large validation part: the covariate stacker needs >= 10 validation rows to be fitted.
    cfg = _cfg(
        dataset,
        tmp_path / "pkg",
        command="osteoscan train --data X --out Y",
        val_fraction=0.35,
        test_fraction=0.25,
    )
    res = train_models(cfg, progress=events.append)
    from osteoscan.package import save_package

    path = save_package(cfg.out, res.manifest, res.models, card=res.card, report=res.report)
    manifest = Manifest.from_dict(json.loads((path / "manifest.json").read_text()))
    manifest.validate()
    td = manifest.training_data
    assert td["n_files"] == 37
    assert td["n_duplicate_groups"] >= 1 and td["n_conflicting_groups"] == 1
    assert td["n_dropped"] == 2 and td["n_images"] == 35
    assert set(td["n_per_class"]) == {"normal", "osteopenia", "osteoporosis"}
    assert "split" in td and td["split"]["method"] == "train_val_test"
    assert manifest.classes == ["normal", "osteopenia", "osteoporosis"]
    assert manifest.positive_classes == ["osteoporosis"]
    assert 0.0 <= manifest.threshold <= 1.0 and manifest.target_sensitivity == 0.9
    assert manifest.covariates == ["age", "sex"] and manifest.fusion is not None
    assert {"image_only", "combined"} <= set(manifest.metrics)
    auc = manifest.metrics["image_only"]["roc_auc"]
    assert set(auc) >= {"value", "ci95", "per_class", "macro"}
    assert len(manifest.members) == 1 and manifest.members[0].temperature > 0
    assert manifest.command.startswith("osteoscan train")
    card = (path / "card.md").read_text()
    assert "NOT FOR CLINICAL USE" in card and "conflicting" in card
    assert {p.name for p in (path / "report").iterdir()} >= {
        "roc.png", "confusion_matrix.png", "training_curves.png"
    }  # fmt: skip
    kinds = {e.kind for e in events}
    assert {"phase", "read", "epoch_end", "member_end"} <= kinds

    # Reload: member logits are bit-identical to the in-memory trained model.
    pkg = load_package(path)
    x = torch.from_numpy(
        np.stack([np.full((64, 64), v, np.uint16) for v in (0, 20000, 65535)])[:, None]
    )
    ens = Ensemble(pkg, device="cpu")
    reloaded = ens.predict_member_logits(x)[0]
    mean, std = pkg.manifest.members[0].mean, pkg.manifest.members[0].std
    from osteoscan.preprocess import to_model_input

    with torch.inference_mode():
        original = res.models[0].eval()(to_model_input(x, mean, std))
    assert torch.equal(reloaded.cpu(), original)
    # Covariates flow into fusion at scan time.
    from osteoscan.covariates import Covariates

    pred = ens.predict(x, covariates=[Covariates(70.0, "F"), None, Covariates(40.0, None)])
    assert pred.covariates_used == ["age,sex", "", "age"]


def test_kfold_members_and_deterministic(dataset: Path, tmp_path: Path):
    cfg = _cfg(dataset, folds=3, epochs=1)
    a = train_models(cfg)
    assert len(a.models) == 3 and [m.fold for m in a.manifest.members] == [0, 1, 2]
    assert a.manifest.training_data["split"]["method"] == "kfold3"
    # Out-of-fold evaluation covers every kept image once.
    assert a.manifest.metrics["image_only"]["n"] == 35
    assert "covariates_only" in a.manifest.metrics
    b = train_models(cfg)
    for ma, mb in zip(a.models, b.models, strict=True):
        for (ka, ta), (_, tb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
            assert torch.equal(ta, tb), ka
    assert a.manifest.threshold == b.manifest.threshold


def test_repeated_arch_is_a_seed_ensemble(dataset: Path, tmp_path: Path):
    """``--arch X --arch X``: two members of one architecture on the same split, each from its
    own seed; the first keeps the seed (and so the weights) a single ``--arch X`` run trains."""
    one = train_models(_cfg(dataset, covariates_csv=None, epochs=1))
    path = train(_cfg(dataset, tmp_path / "two", covariates_csv=None, epochs=1,
                      archs=("tiny_cnn",) * 2))  # fmt: skip
    two = load_package(path)
    assert [m.arch for m in two.manifest.members] == ["tiny_cnn", "tiny_cnn"]
    first, second = (m.state_dict() for m in two.members)
    for k, t in one.models[0].state_dict().items():
        assert torch.equal(t, first[k]), k
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert len({m.sha256 for m in two.manifest.members}) == 2
    # One split for both members: the held-out part is scored by each (mean of two).
    assert two.manifest.metrics["image_only"]["n"] == one.manifest.metrics["image_only"]["n"]


def test_without_covariates_falls_back_to_image_only(dataset: Path, tmp_path: Path):
    path = train(_cfg(dataset, tmp_path / "p", covariates_csv=None, epochs=1))
    m = load_package(path).manifest
    assert m.fusion is None and m.covariates == []
    assert "combined" not in m.metrics and "image_only" in m.metrics


def test_unknown_positive_class_is_usage_error(dataset: Path):
    from osteoscan.errors import UsageError

    with pytest.raises(UsageError):
        train_models(_cfg(dataset, positive=("fracture",)))


def test_test_time_flip_package_scores_the_mean_over_the_mirror_image(dataset: Path,
                                                                     tmp_path: Path):  # fmt: skip
    path = train(_cfg(dataset, tmp_path / "flip", covariates_csv=None, epochs=2,
                      test_time_flip=True))  # fmt: skip
    pkg = load_package(path)
    assert json.loads((path / "manifest.json").read_text())["schema_version"] == 4
    assert [m.test_time_flip for m in pkg.manifest.members] == [True]
    assert "Test-time flip" in (path / "card.md").read_text()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 65535, (4, 1, 64, 64), dtype=np.uint16))
    got = Ensemble(pkg, device="cpu").predict_member_logits(x)[0]
    from osteoscan.preprocess import to_model_input
    from osteoscan.train.steps import predict_logits

    spec = pkg.manifest.members[0]
    model = pkg.members[0].eval()
    with torch.inference_mode():
        a = model(to_model_input(x, spec.mean, spec.std))
        b = model(to_model_input(x.flip(-1), spec.mean, spec.std))
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(got, (a + b) / 2, atol=1e-5)
    # The trainer's own scoring (validation, held-out part) computes the same thing.
    held = predict_logits(model, x, mean=spec.mean, std=spec.std, flip=True)
    assert np.allclose(held, got.numpy(), atol=1e-5)
