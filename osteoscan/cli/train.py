"""`osteoscan train`: fine-tune a calibrated ensemble on labelled radiographs → model package.

Thin: :func:`osteoscan.train.trainer.train` does the work and reports progress through
:class:`~osteoscan.train.loop.TrainEvent` callbacks; this module parses options (declared once,
as the ``*Opt`` aliases below) and :mod:`osteoscan.cli.train_render` renders the events.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from osteoscan.cli.train_render import LogRenderer, RichRenderer, fmt, report_console
from osteoscan.errors import UsageError
from osteoscan.train.recipe import PRESET_HELP, list_presets, make_config

Opt = typer.Option
FLAG = {"metavar": ""}  # on/off options take no value: no "<bool>" in the help

DataOpt = Annotated[Path, Opt("--data", help="Folder with one sub-folder per class, or a "
                              "path,label[,group] CSV.")]  # fmt: skip
OutOpt = Annotated[Path, Opt("--out", help="Folder to write the model package to.")]
ArchOpt = Annotated[list[str] | None, Opt("--arch", metavar="ARCH", help="Architecture (repeat "
                                          "for an ensemble; the same one repeated: members "
                                          "from different seeds).")]  # fmt: skip
PresetOpt = Annotated[str, Opt("--preset", help="Recipe preset (listed above).")]
FoldsOpt = Annotated[int | None, Opt("--folds", help="K-fold cross-validation (fold models = "
                                     "members); 1 = train/val/test split.")]  # fmt: skip
EpochsOpt = Annotated[int | None, Opt("--epochs", help="Maximum epochs per member (both stages).")]
Stage1Opt = Annotated[int | None, Opt("--stage1-epochs", help="Epochs training the new head on a "
                                      "frozen backbone (0: one stage).")]  # fmt: skip
UnfreezeOpt = Annotated[int | None, Opt("--unfreeze-blocks", help="Top blocks unfrozen in stage 2 "
                                        "(-1: all).")]  # fmt: skip
ViewsOpt = Annotated[int | None, Opt("--feature-views", help="Compute frozen layers once per stage "
                                     "for the image + N-1 augmented copies and train the rest on "
                                     "them (~2x faster on CPU; 0: off).")]  # fmt: skip
LrOpt = Annotated[float | None, Opt("--lr", help="Learning rate of stage 1 (or of single-stage "
                                    "training).")]  # fmt: skip
Lr2Opt = Annotated[float | None, Opt("--lr-stage2", help="Learning rate of stage 2.")]
OptimOpt = Annotated[str | None, Opt("--optimizer", help="adam, adamw, rmsprop or sgd.")]
SchedOpt = Annotated[str | None, Opt("--schedule", help="cosine, plateau or none.")]
PatienceOpt = Annotated[int | None, Opt("--patience", help="Early stopping: epochs without "
                                        "validation-AUC gain.")]  # fmt: skip
EmaOpt = Annotated[float | None, Opt("--ema-decay", help="Validate and keep a moving average "
                                     "of the weights (per-step decay, e.g. 0.998; 0: "
                                     "off).")]  # fmt: skip
AugmentOpt = Annotated[bool | None, Opt("--augment/--no-augment", help="Random affine "
                                        "augmentation.", **FLAG)]  # fmt: skip
FlipOpt = Annotated[bool | None, Opt("--test-time-flip/--no-test-time-flip", help="Average each "
                                     "image's logits with its mirror image's, in validation and "
                                     "scans (2x scoring cost; on in --preset large).",
                                     **FLAG)]  # fmt: skip
PositiveOpt = Annotated[str | None, Opt("--positive", help="Screening-positive classes, comma-"
                                        "separated (default osteoporosis; required when the "
                                        "classes are not the osteoporosis ones).")]  # fmt: skip
ClassesOpt = Annotated[str | None, Opt("--classes", help="Class order, comma-separated (e.g. "
                                       "0,1,2,3,4); default: from the data.")]  # fmt: skip
OrdinalOpt = Annotated[bool, Opt("--ordinal", help="The classes are ordered grades (in --classes "
                                 "order): ordinal head and loss; evaluate adds QWK and MAE.",
                                 **FLAG)]  # fmt: skip
OrdHeadOpt = Annotated[str | None, Opt("--ordinal-head", help="With --ordinal: adjacent (one "
                                       "severity axis, rank-one logits) or soft (softmax head "
                                       "on soft ordinal labels).")]  # fmt: skip
TargetOpt = Annotated[str, Opt("--target", help="class (labels) or tscore (a path,tscore[,group] "
                               "CSV: regression on T-scores, WHO categories from the predicted "
                               "T-score).")]  # fmt: skip
SensOpt = Annotated[float | None, Opt("--target-sensitivity", help="Sensitivity the stored "
                                      "threshold reaches on held-out data.")]  # fmt: skip
CovOpt = Annotated[Path | None, Opt("--covariates", help="CSV with path (or file stem), age, sex "
                                    "per image.")]  # fmt: skip
CovColsOpt = Annotated[str | None, Opt("--covariate-columns", help="Column names in the "
                                       "covariates CSV: path,age,sex.")]  # fmt: skip
DeviceOpt = Annotated[str, Opt("--device", help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int | None, Opt("--seed", help="Random seed (splits, initialisation, "
                                    "augmentation).")]  # fmt: skip
WeightsOpt = Annotated[Path | None, Opt("--weights", help="ImageNet weights file "
                                        "(.safetensors/.pth) for the architecture.")]  # fmt: skip
RandomOpt = Annotated[bool, Opt("--random-init", help="Train from random initialisation (no "
                                "pretrained weights).", **FLAG)]  # fmt: skip
SizeOpt = Annotated[int | None, Opt("--size", help="Input size in pixels.")]
RoiOpt = Annotated[str | None, Opt("--roi", help="Region fed to the model: none (whole image), "
                                   "knee_joint (one crop around the joints) or knee_pair (each "
                                   "knee joint in its own square, side by side).")]  # fmt: skip
ClaheOpt = Annotated[bool | None, Opt("--clahe/--no-clahe", help="CLAHE contrast equalisation of "
                                      "the input.", **FLAG)]  # fmt: skip
MethodOpt = Annotated[str | None, Opt("--method", help="finetune (two-stage fine-tuning) or probe "
                                      "(frozen backbone + regularised logistic head: better on a "
                                      "few hundred images).")]  # fmt: skip
ProbeCOpt = Annotated[float | None, Opt("--probe-c", help="Probe: inverse L2 strength.")]
BatchOpt = Annotated[int | None, Opt("--batch-size", help="Training batch size.")]
NameOpt = Annotated[str | None, Opt("--name", help="Model name (default: the --out folder "
                                    "name).")]  # fmt: skip
PartOpt = Annotated[str, Opt("--body-part", help="Body part the model serves: knee or spine.")]
CacheOpt = Annotated[Path | None, Opt("--cache-dir", help="Keep preprocessed images here between "
                                      "runs.")]  # fmt: skip
ThreadsOpt = Annotated[int | None, Opt("--threads", help="CPU threads for torch.")]
UnreadableOpt = Annotated[bool, Opt("--allow-unreadable", help="Train even when more than 5 % of "
                                    "the files cannot be read (they are left out and listed).",
                                    **FLAG)]  # fmt: skip
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="Plain log lines instead of live progress.",
                               **FLAG)]  # fmt: skip


def _help() -> str:
    width = max(len(name) for name in PRESET_HELP)
    lines = [f"  {name:<{width}}  {PRESET_HELP.get(name, '')}" for name in list_presets()]
    return (
        "Fine-tune a calibrated CNN ensemble on labelled radiographs and write a model package."
        "\n\n\b\nPresets (--preset; explicit options override them):\n" + "\n".join(lines)
    )


def _summary(console: Console, path: Path) -> None:
    from osteoscan.package import read_manifest

    m = read_manifest(path)
    console.print(f"model {m.name} {m.version}: held-out metrics", markup=False)
    t = Table()
    t.add_column("")
    for col in ("ROC-AUC (pos. vs rest)", "95 % CI", "macro AUC", "sensitivity", "specificity"):
        t.add_column(col, justify="right")
    for key, title in (
        ("image_only", "image only"),
        ("covariates_only", "covariates only"),
        ("combined", "image + covariates"),
    ):
        mm = m.metrics.get(key)
        if not mm:
            continue
        auc = mm["roc_auc"]
        lo, hi = auc.get("ci95") or [None, None]
        ci = f"{lo:.3f}-{hi:.3f}" if lo is not None and hi is not None else ""
        cells = [auc.get("value"), auc["macro"].get("value")]
        cells += [mm["sensitivity"].get("value"), mm["specificity"].get("value")]
        t.add_row(title, fmt(cells[0]), ci, *(fmt(c) for c in cells[1:]))
    console.print(t)
    img = m.metrics.get("image_only") or {}
    extra = [f"{title} {fmt(img[key].get('value'))}" for key, title in
             (("accuracy", "accuracy"), ("qwk", "QWK"), ("mae", "mean abs. grade error"))
             if key in img]  # fmt: skip
    ts = img.get("tscore")
    if ts:
        extra += [f"T-score MAE {fmt(ts['mae'].get('value'))}",
                  f"Pearson r {fmt(ts['pearson_r'].get('value'))}"]  # fmt: skip
    console.print("image only: " + ", ".join(extra), highlight=False)
    td = m.training_data
    console.print(
        f"{td.get('n_images')} images used ({td.get('n_duplicate_groups')} duplicate groups, "
        f"{td.get('n_conflicting_groups')} conflicting, {td.get('n_dropped')} dropped); "
        f"threshold {m.threshold:.4f} for sensitivity {m.target_sensitivity}; "
        f"{m.metrics.get('evaluation', '')}",
        highlight=False,
    )


def _command_line(ctx: typer.Context) -> str:
    """The options given on the command line, canonically spelled (stored in the manifest)."""
    parts = ["osteoscan", "train"]
    for param in ctx.command.params:
        # Compare by name: Typer may carry its own copy of click's ParameterSource enum.
        source = ctx.get_parameter_source(param.name) if param.name else None
        if getattr(source, "name", "") != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if isinstance(value, bool):
            parts.append(flag if value else getattr(param, "secondary_opts", [flag])[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _csv_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise UsageError("empty list")
    return items


def _overrides(ctx: typer.Context) -> dict[str, Any]:
    """:func:`make_config` overrides from the parsed options (``None``: not given)."""
    p = ctx.params
    if p["body_part"] not in ("knee", "spine"):
        raise UsageError("--body-part must be knee or spine")
    if p["random_init"] and p["weights"] is not None:
        raise UsageError("--random-init and --weights exclude each other")
    cols = _csv_list(p["covariate_columns"])
    if cols is not None and len(cols) != 3:
        raise UsageError("--covariate-columns needs three names: path,age,sex")
    pre = {k: p[k] for k in ("roi", "clahe") if p[k] is not None}
    same = ("data", "out", "folds", "epochs", "stage1_epochs", "unfreeze_blocks", "feature_views",
            "lr", "lr_stage2", "optimizer", "schedule", "patience", "target_sensitivity", "device",
            "seed", "weights", "size", "batch_size", "cache_dir", "method", "probe_c",
            "test_time_flip", "ordinal_head", "ema_decay")  # fmt: skip
    return {
        **{k: p[k] for k in same},
        "archs": tuple(p["arch"]) if p["arch"] else None, "positive": _csv_list(p["positive"]),
        "classes": _csv_list(p["classes"]), "ordinal": p["ordinal"] or None,
        "target": p["target"],
        "covariates_csv": p["covariates"], "covariate_columns": cols,
        "random_init": p["random_init"] or None, "name": p["name"] or p["out"].name,
        "body_parts": (p["body_part"],), "num_threads": p["threads"], "preprocess": pre or None,
        "command": _command_line(ctx), "allow_unreadable": p["allow_unreadable"] or None,
    }  # fmt: skip


def _run(ctx: typer.Context) -> None:
    cfg = make_config(ctx.params["preset"], **_overrides(ctx))
    if ctx.params["augment"] is not None:
        cfg.augment.enabled = ctx.params["augment"]
    if not Path(ctx.params["data"]).exists():
        raise UsageError(f"--data {ctx.params['data']}: no such file or folder")
    from osteoscan.train.distributed import launched
    from osteoscan.train.trainer import train  # heavy imports only when running

    where = launched()  # under torchrun: rank 0 alone reports
    t0 = time.perf_counter()
    if where is not None and where[0] != 0:
        train(cfg)
        return
    console = Console(stderr=True)
    quiet = ctx.params["quiet"] or not console.is_terminal
    renderer = LogRenderer(console) if quiet else RichRenderer(console)
    try:
        path = train(cfg, progress=renderer)
    finally:
        renderer.close()
    assert path is not None  # a single process and rank 0 write the package
    _summary(report_console(), path)
    console.print(
        f"trained in {time.perf_counter() - t0:.1f} s → {path}", highlight=False, soft_wrap=True
    )


def register(app: typer.Typer) -> None:
    """Add the `train` command to the app."""

    @app.command("train", help=_help())
    def train_cmd(
        ctx: typer.Context, data: DataOpt, out: OutOpt, arch: ArchOpt = None,
        preset: PresetOpt = "default", folds: FoldsOpt = None, epochs: EpochsOpt = None,
        stage1_epochs: Stage1Opt = None, unfreeze_blocks: UnfreezeOpt = None,
        feature_views: ViewsOpt = None, lr: LrOpt = None,
        lr_stage2: Lr2Opt = None, optimizer: OptimOpt = None, schedule: SchedOpt = None,
        patience: PatienceOpt = None, ema_decay: EmaOpt = None, augment: AugmentOpt = None,
        test_time_flip: FlipOpt = None, positive: PositiveOpt = None,
        classes: ClassesOpt = None, ordinal: OrdinalOpt = False,
        ordinal_head: OrdHeadOpt = None, target: TargetOpt = "class",
        target_sensitivity: SensOpt = None, covariates: CovOpt = None,
        covariate_columns: CovColsOpt = None, device: DeviceOpt = "auto", seed: SeedOpt = None,
        weights: WeightsOpt = None, random_init: RandomOpt = False, size: SizeOpt = None,
        roi: RoiOpt = None, clahe: ClaheOpt = None, method: MethodOpt = None,
        probe_c: ProbeCOpt = None, batch_size: BatchOpt = None, name: NameOpt = None,
        body_part: PartOpt = "knee", cache_dir: CacheOpt = None, threads: ThreadsOpt = None,
        allow_unreadable: UnreadableOpt = False, quiet: QuietOpt = False,
    ) -> None:  # fmt: skip
        _run(ctx)  # the options arrive in ctx.params
