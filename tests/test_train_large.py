"""The ``large`` preset: a recipe for thousands of images, and the knee-kl benchmark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from osteoscan.errors import UsageError
from osteoscan.train.recipe import PRESET_HELP, make_config

KNEE_KL = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-kl"
KNEE_KL = Path(os.environ.get("OSTEOSCAN_KNEE_KL", KNEE_KL))


def test_large_preset_is_a_single_split_with_mild_augmentation() -> None:
    cfg = make_config("large", classes=("0", "1", "2", "3", "4"), positive=("2", "3", "4"),
                      ordinal=True)  # fmt: skip
    assert cfg.folds == 1 and cfg.size == 224 and cfg.archs == ("efficientnet_lite0",)
    assert cfg.val_fraction + cfg.test_fraction < 0.16  # thousands of images: train on most
    assert cfg.augment.enabled and cfg.augment.shift <= 0.1 and cfg.augment.rotation <= 10
    assert not cfg.class_weights and cfg.ordinal and cfg.stage1_epochs < cfg.epochs
    assert "large" in PRESET_HELP
    # Trained with flips, scored as the mean over the image and its mirror image.
    assert cfg.test_time_flip and cfg.augment.hflip > 0
    # Explicit options still win over the preset.
    assert make_config("large", epochs=3, size=160).size == 160
    assert not make_config("large", test_time_flip=False).test_time_flip
    with pytest.raises(UsageError, match="--no-test-time-flip"):
        make_config("large", method="probe")  # the probe has no flip-averaged validation


@pytest.mark.slow
@pytest.mark.skipif(not (KNEE_KL / "train.csv").is_file(), reason="knee-kl data not present")
def test_large_preset_on_knee_kl_subset(tmp_path: Path) -> None:
    """A few hundred real knee radiographs, 3 epochs: the loss falls, metrics are produced."""
    import csv
    import random

    rows = list(csv.DictReader((KNEE_KL / "train.csv").open()))
    random.Random(0).shuffle(rows)
    sub = tmp_path / "sub.csv"
    with sub.open("w") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for r in rows[:400]:
            w.writerow([str(KNEE_KL / r["path"]), r["label"], r["group"]])
    from osteoscan.train.trainer import train_models

    cfg = make_config("large", data=sub, classes=("0", "1", "2", "3", "4"),
                      positive=("2", "3", "4"), ordinal=True, epochs=3, n_boot=100)  # fmt: skip
    res = train_models(cfg)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    held = res.manifest.metrics["image_only"]
    # 20 test images after 3 epochs: the numbers exist; how good they are is the full run's job.
    assert held["qwk"]["value"] is not None and held["roc_auc"]["value"] is not None
    assert res.manifest.extra["timings"]["finetune_img_s"] > 0


def test_renderers_show_forward_progress_and_throughput() -> None:
    """Long forward passes (validation, probe features, held-out scoring) and img/s are shown."""
    import io

    from rich.console import Console

    from osteoscan.cli.train_render import LogRenderer, RichRenderer
    from osteoscan.train.loop import TrainEvent

    events = [
        TrainEvent("member_start", n_epochs=2),
        TrainEvent("progress", message="probe features", step=32, n_steps=64),
        TrainEvent("progress", message="probe features", step=64, n_steps=64),
        TrainEvent("epoch_start", epoch=1, n_epochs=2, stage="finetune", n_steps=10),
        TrainEvent("batch", epoch=1, n_epochs=2, stage="finetune", step=4, n_steps=10,
                   metrics={"loss": 1.25}),  # fmt: skip
        TrainEvent("epoch_end", epoch=1, n_epochs=2, stage="finetune",
                   metrics={"train_loss": 1.0, "val_loss": 1.1, "val_auc": 0.8, "seconds": 9.0,
                            "train_img_s": 15.4, "val_img_s": 26.0}),
    ]  # fmt: skip
    buf = io.StringIO()
    log = LogRenderer(Console(file=buf, width=200), read_every=0.0, batch_every=0.0)
    for ev in events:
        log(ev)
    text = buf.getvalue()
    assert "probe features: 32/64 images" in text and "probe features: 64/64 images" in text
    assert "train 15.4 img/s, val 26.0 img/s" in text
    assert "epoch 1 [finetune]: batch 4/10, loss 1.250" in text  # a long epoch says how far
    rich_buf = io.StringIO()
    live = RichRenderer(Console(file=rich_buf, force_terminal=True, width=200))
    try:
        for ev in events:
            live(ev)
        assert live.forward is not None
        assert live.progress.tasks[live.forward].completed == 64
    finally:
        live.close()
