"""Training recipe: every knob of ``osteoscan train`` in one dataclass, plus named presets.

A :class:`TrainConfig` fully describes a training run; it is stored (as plain JSON) in the model
package manifest so a package says exactly how it was made. Presets are sets of overrides applied
on top of the dataclass defaults; explicit options always win over the preset
(:func:`make_config`).

Presets (times measured on 2 shared CPU cores with the knee-xray folder, ~170 de-duplicated
images; see the report in the model card for the exact numbers of a run):

- ``quick``: EfficientNet-Lite0 at 224 px, one stratified group-aware train/val/test split,
  2 + 4 epochs. A smoke run: ~100 CPU-seconds in total including reading the images (measured
  3 min wall on 2 cores shared with other jobs at load ~6; well under on an idle machine).
- ``default``: EfficientNet-Lite0 at 288 px, 5-fold cross-validation (fold models become the
  ensemble's members), 3 + 7 epochs with early stopping (patience 3), top 2 blocks fine-tuned.
  Estimated 15-25 minutes on 2 idle CPU cores (extrapolated from per-epoch timings, not yet
  measured end to end); a few minutes on a GPU.
- ``vgg16-paper``: VGG-16, RMSprop lr 1e-3, two-stage fine-tuning, 5 folds (Abubakar et al. 2022).
- ``effnet-paper``: EfficientNet-B0, Adam lr 1e-4, weight decay 1e-5, heavy augmentation.
- ``large``: thousands of images (designed on the 5,778 knee-kl training radiographs, KL grades):
  EfficientNet-Lite0 at 224 px, one split with small validation (10 %) and test (5 %) parts,
  2 head epochs then 9 epochs fine-tuning the top 4 of 7 blocks (AdamW, cosine), mild
  augmentation (rotation 10 degrees, shift 6 %, zoom 10 %, flips: the joint stays in view), no
  class weights (they trade accuracy for rare-class recall), and the frozen-feature cache with 8
  views (osteoscan.train.frozen: the frozen lower layers run once over the image and 7 augmented
  copies, so a CPU epoch runs at ~27-31 instead of ~18 images/s; 2 views overfitted), and the
  test-time flip (validation, held-out part and scans average each image's logits with its
  mirror image's). Measured on 2 CPU cores: 36-39 minutes in all (18 on a newer AVX-512 CPU),
  KL >= 2 ROC-AUC 0.896-0.906 and five-grade accuracy 0.607-0.617 on knee-kl's val.csv over three
  trainings (README, "Knee-kl benchmark").
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osteoscan.errors import UsageError

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "plateau", "none")
ROIS: tuple[str, ...] = ("none", "knee_joint", "knee_pair")  # PreprocessConfig.roi values
TARGETS: tuple[str, ...] = ("class", "tscore")
ORDINAL_HEADS: tuple[str, ...] = ("adjacent", "soft")


@dataclass
class AugmentConfig:
    """Random affine augmentation applied on the device to uint16 batches (training only).

    ``rotation`` in degrees (uniform in ±rotation); ``shift`` as a fraction of the image side;
    ``shear`` as a shear *factor* (tan of the shear angle; 0.2 ≈ 11°); ``zoom`` as a fraction
    (scale uniform in [1 - zoom, 1 + zoom]); ``hflip`` probability of a horizontal flip. The
    defaults are the papers' set (rotation 20°, shifts 20 %, shear 20 %, zoom 20 %, flips).
    """

    enabled: bool = True
    rotation: float = 20.0
    shift: float = 0.2
    shear: float = 0.2
    zoom: float = 0.2
    hflip: float = 0.5


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "use the architecture's default"."""

    # --- data -----------------------------------------------------------------------------
    data: Path | None = None
    out: Path | None = None
    name: str = "knee-model"
    version: str = "1.0.0"
    body_parts: tuple[str, ...] = ("knee",)
    # Screening-positive classes; empty: "osteoporosis" when the classes are the osteoporosis
    # set, else required (osteoscan.train.data.resolve_positive).
    positive: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None  # fixed class order (--classes); None: from the data
    # "class": labels are classes; "tscore": a path,tscore CSV, a regression head whose predicted
    # T-score gives the WHO category probabilities (osteoscan.train.objectives).
    target: str = "class"
    ordinal: bool = False  # ordered classes: an ordinal head (ordinal_head) and grade cut-offs
    # "adjacent": the rank-one adjacent-category logit head; "soft": a softmax head on soft
    # ordinal labels (osteoscan.train.objectives).
    ordinal_head: str = "adjacent"
    target_sensitivity: float = 0.90
    covariates_csv: Path | None = None
    # Column names in the covariates CSV: (path/stem column, age column, sex column).
    covariate_columns: tuple[str, str, str] = ("path", "age", "sex")
    use_covariates: bool = True
    # Unreadable files above this share of all files stop the run (exit 2) unless allowed.
    max_unreadable: float = 0.05
    allow_unreadable: bool = False
    # --- split ----------------------------------------------------------------------------
    # folds <= 1: one stratified group-aware train/val/test split; folds >= 2: K-fold CV whose
    # fold models become ensemble members (an inner validation split of each fold's training
    # part drives early stopping and temperature; the held-out fold gives out-of-fold scores).
    folds: int = 1
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # --- model ----------------------------------------------------------------------------
    archs: tuple[str, ...] = ("efficientnet_lite0",)
    size: int | None = 224
    weights: Path | None = None
    random_init: bool = False
    # --- optimisation ---------------------------------------------------------------------
    # "finetune": two-stage fine-tuning (the papers' recipe); "probe": frozen backbone with a
    # regularised logistic head (standardise → PCA → logistic regression), which generalises
    # better on a few hundred images. See osteoscan.train.probe.
    method: str = "finetune"
    probe_c: float = 0.01  # inverse L2 strength of the probe's logistic regression
    probe_components: int = 64  # PCA size before the probe's logistic regression
    epochs: int = 6  # total epoch budget (stage 1 + stage 2)
    stage1_epochs: int = 2  # head only, backbone frozen; 0 = single-stage training
    unfreeze_blocks: int = 2  # stage 2: top blocks unfrozen (-1 = everything)
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 1e-3  # stage 1 (new head)
    lr_stage2: float = 1e-4  # stage 2 (lower, the backbone is pretrained)
    weight_decay: float = 1e-5
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 0
    patience: int = 4  # early stopping on validation ROC-AUC (positive-vs-rest)
    class_weights: bool = True
    label_smoothing: float = 0.0
    grad_clip: float | None = 5.0
    # > 0: validate and keep an exponential moving average of the weights (per-step decay,
    # osteoscan.train.ema) instead of the last step's weights. 0: off.
    ema_decay: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Average each image's logits with its mirror image's, in validation (temperature, threshold
    # and grade cut-offs are fitted on those) and at scan time (MemberSpec.test_time_flip).
    # Doubles the cost of scoring; for models trained with flips (augment.hflip > 0).
    test_time_flip: bool = False
    # > 0: compute the frozen lower layers once per stage for this many versions of each
    # training image (the image and views - 1 augmentations) and train only the rest on them
    # (osteoscan.train.frozen): ~2x faster epochs on a CPU, fixed augmented copies instead of
    # fresh ones. 0: every epoch runs the whole network on freshly augmented images.
    feature_views: int = 0
    # --- runtime --------------------------------------------------------------------------
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA, off for CPU
    channels_last: bool = True
    seed: int = 0
    num_threads: int | None = None
    # Threads reading and preprocessing files (decoders release the GIL); None: one per CPU,
    # at most 8. Reading is a one-off pass: the model trains from the in-memory (and, with
    # --cache-dir, on-disk) cache of preprocessed images afterwards.
    read_workers: int | None = None
    cache_dir: Path | None = None
    # --- preprocessing / evaluation -------------------------------------------------------
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig overrides
    n_boot: int = 1000
    command: str = ""
    preset: str | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` for option values that cannot work."""
        if self.method not in ("finetune", "probe"):
            raise UsageError(f"--method must be finetune or probe, not {self.method!r}")
        if self.probe_c <= 0 or self.probe_components < 1:
            raise UsageError("the probe needs C > 0 and at least one PCA component")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.epochs < 1:
            raise UsageError("--epochs must be >= 1")
        if not 0 <= self.stage1_epochs <= self.epochs:
            raise UsageError("stage-1 epochs must be between 0 and --epochs")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise UsageError("--target-sensitivity must be in (0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError("--ema-decay must be in [0, 1)")
        if self.feature_views < 0:
            raise UsageError("feature views must be >= 0")
        if self.batch_size < 2:
            raise UsageError("--batch-size must be >= 2 (batch norm needs two images)")
        if self.folds < 0 or self.folds == 1 and not 0 < self.test_fraction < 1:
            raise UsageError("--folds must be >= 0 and the test fraction in (0, 1)")
        if not self.archs:
            raise UsageError("at least one --arch is needed")
        if self.size is not None and self.size < 16:
            raise UsageError("--size must be >= 16 pixels")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.ordinal_head not in ORDINAL_HEADS:
            raise UsageError(f"--ordinal-head must be one of {', '.join(ORDINAL_HEADS)}")
        if self.ordinal_head != "adjacent" and not self.ordinal:
            raise UsageError("--ordinal-head is for ordered grades: add --ordinal")
        if self.target == "tscore" and (self.ordinal or self.classes):
            raise UsageError("--target tscore has the three WHO classes: no --ordinal/--classes")
        if self.method == "probe" and self.test_time_flip:
            raise UsageError("--test-time-flip is for fine-tuned members: add --no-test-time-flip")
        if self.method == "probe" and (self.ordinal or self.target != "class"):
            raise UsageError("--method probe fits class labels only: use --method finetune")
        if self.classes is not None and len(set(self.classes)) < 2:
            raise UsageError("--classes needs at least two distinct names")
        roi = self.preprocess.get("roi", "none")
        if roi not in ROIS:
            raise UsageError(f"--roi must be one of {', '.join(ROIS)}, not {roi!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name or ""):
            raise UsageError(f"model name {self.name!r}: use letters, digits, '.', '_' or '-'")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (paths as strings), as stored in the manifest."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


# Each preset is a set of overrides on the TrainConfig defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "archs": ("efficientnet_lite0",),
        "size": 224,
        "folds": 1,
        "epochs": 6,
        "stage1_epochs": 2,
        "unfreeze_blocks": 2,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 1e-3,
        "lr_stage2": 3e-4,
        "patience": 3,
        "n_boot": 500,
    },
    "default": {
        "archs": ("efficientnet_lite0",),
        "size": 288,
        "folds": 5,
        "epochs": 10,
        "stage1_epochs": 3,
        "unfreeze_blocks": 2,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 1e-3,
        "lr_stage2": 2e-4,
        "patience": 3,
        "n_boot": 1000,
    },
    "vgg16-paper": {
        "archs": ("vgg16",),
        "size": 224,
        "folds": 5,
        "epochs": 30,
        "stage1_epochs": 10,
        "unfreeze_blocks": 1,
        "batch_size": 16,
        "optimizer": "rmsprop",
        "lr": 1e-3,
        "lr_stage2": 1e-5,
        "weight_decay": 0.0,
        "schedule": "plateau",
        "patience": 6,
    },
    "large": {
        "archs": ("efficientnet_lite0",),
        "size": 224,
        "folds": 1,
        "val_fraction": 0.10,
        "test_fraction": 0.05,
        "epochs": 11,
        "stage1_epochs": 2,
        "unfreeze_blocks": 4,
        "feature_views": 8,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 1e-3,
        "lr_stage2": 3e-4,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "patience": 4,
        "class_weights": False,
        "augment": {"rotation": 10.0, "shift": 0.06, "shear": 0.05, "zoom": 0.1, "hflip": 0.5},
        "test_time_flip": True,
        "n_boot": 1000,
    },
    "effnet-paper": {
        "archs": ("efficientnet_b0",),
        "size": 224,
        "folds": 5,
        "epochs": 30,
        "stage1_epochs": 5,
        "unfreeze_blocks": -1,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 1e-4,
        "lr_stage2": 1e-4,
        "weight_decay": 1e-5,
        "schedule": "plateau",
        "patience": 6,
    },
}


# One line per preset for ``osteoscan train -h`` (times: 2 CPU cores, ~170 knee images).
PRESET_HELP: dict[str, str] = {
    "quick": "EfficientNet-Lite0 224 px, one split, 6 epochs (~3 min)",
    "default": "EfficientNet-Lite0 288 px, 5 folds, 10 epochs (~20 min)",
    "vgg16-paper": "VGG-16, RMSprop, 5 folds, 30 epochs (Abubakar et al. 2022)",
    "effnet-paper": "EfficientNet-B0, Adam, all layers, 5 folds, 30 epochs",
    "large": "thousands of images: Lite0 224 px, one split, 2 + 9 epochs, top 4 blocks on cached "
    "frozen features, test-time flip (~40 min for 5,800 images)",
}


def list_presets() -> list[str]:
    """Names of the available presets."""
    return list(PRESETS)


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from a preset plus explicit overrides.

    ``None`` values in ``overrides`` mean "not given" and never override the preset, so a CLI can
    pass every option straight through.
    """
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"unknown training option {key!r}")
        if value is None:
            continue
        if key == "preprocess" and isinstance(values.get("preprocess"), dict):
            # Preprocessing options given explicitly refine the preset's, key by key.
            values[key] = {**values["preprocess"], **value}
        else:
            values[key] = value
    for key in ("archs", "positive", "body_parts", "covariate_columns", "classes"):
        if key in values and isinstance(values[key], (list, str)):
            values[key] = (values[key],) if isinstance(values[key], str) else tuple(values[key])
    if isinstance(values.get("augment"), dict):
        values["augment"] = AugmentConfig(**values["augment"])
    # An explicit --epochs smaller than the preset's stage-1 budget shrinks stage 1 with it.
    cfg = TrainConfig(**values)
    if cfg.stage1_epochs > cfg.epochs:
        cfg.stage1_epochs = max(0, cfg.epochs // 3)
    cfg.validate()
    return cfg
