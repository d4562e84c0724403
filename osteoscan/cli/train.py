"""`osteoscan train`: fine-tune a calibrated ensemble on labelled radiographs → model package.

Thin: :func:`osteoscan.train.trainer.train` does the work and reports progress through
:class:`~osteoscan.train.loop.TrainEvent` callbacks; this module parses options and renders the
events (Rich progress with ETA and validation AUC on a terminal, timestamped lines otherwise).
"""

from __future__ import annotations

import datetime as _dt
import math
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from osteoscan.errors import UsageError
from osteoscan.train.recipe import list_presets, make_config

if TYPE_CHECKING:  # the training loop imports torch: only when `train` runs
    from osteoscan.train.loop import TrainEvent


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) and math.isfinite(x) else "n/a"


class LogRenderer:
    """Plain timestamped lines (cron logs, pipes, ``--quiet``)."""

    def __init__(self, console: Console, read_every: float = 10.0) -> None:
        self.console, self.read_every, self._last = console, read_every, 0.0

    def _line(self, text: str) -> None:
        self.console.print(f"{_stamp()} osteoscan train: {text}", markup=False, highlight=False,
                           soft_wrap=True)  # fmt: skip

    def __call__(self, ev: TrainEvent) -> None:
        m = ev.metrics
        if ev.kind in ("phase", "done"):
            self._line(ev.message if ev.kind == "phase" else f"wrote {ev.message}")
        elif ev.kind == "read":
            now = time.monotonic()
            if ev.step == ev.n_steps or now - self._last >= self.read_every:
                self._last = now
                self._line(f"read {ev.step}/{ev.n_steps} images")
        elif ev.kind == "member_start":
            self._line(
                f"member {ev.member + 1}/{ev.n_members}: training ({ev.n_epochs} epochs max)"
            )
        elif ev.kind == "epoch_end":
            self._line(
                f"member {ev.member + 1}/{ev.n_members} epoch {ev.epoch}/{ev.n_epochs} "
                f"[{ev.stage}] train_loss {_fmt(m.get('train_loss'))} val_loss "
                f"{_fmt(m.get('val_loss'))} val_auc {_fmt(m.get('val_auc'))} "
                f"({m.get('seconds', 0.0):.1f} s){' *' if m.get('best') else ''}"
            )
        elif ev.kind == "member_end":
            self._line(
                f"member {ev.member + 1}/{ev.n_members} done: best epoch {m.get('best_epoch')}, "
                f"val_auc {_fmt(m.get('best_val_auc'))}"
            )

    def close(self) -> None:
        """Nothing to tear down."""


class RichRenderer:
    """Live bars: overall epochs (with ETA and current val AUC) and batches of the epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.overall: TaskID | None = None
        self.batches: TaskID | None = None
        self.read: TaskID | None = None
        self.done_epochs = 0
        self.auc = float("nan")
        self._member_epochs = 0
        self._member_base = 0
        self.progress.start()

    def __call__(self, ev: TrainEvent) -> None:
        p = self.progress
        if ev.kind == "phase":
            p.console.print(f"[bold]·[/] {ev.message}")
        elif ev.kind == "read":
            if self.read is None:
                self.read = p.add_task("read", total=ev.n_steps, info="images")
            p.update(self.read, completed=ev.step)
        elif ev.kind == "member_start":
            if self.overall is None:
                # Upper bound: early stopping usually ends members sooner (ETA is pessimistic).
                self.overall = p.add_task("epochs", total=ev.n_members * ev.n_epochs, info="")
                self.batches = p.add_task("batches", total=1, info="")
            self._member_epochs = ev.n_epochs
            self._member_base = self.done_epochs
        elif ev.kind == "epoch_start" and self.batches is not None:
            p.reset(self.batches, total=max(ev.n_steps, 1))
            p.update(self.batches, info=f"member {ev.member + 1}/{ev.n_members} [{ev.stage}]")
        elif ev.kind == "batch" and self.batches is not None:
            p.update(self.batches, completed=ev.step, info=f"loss {_fmt(ev.metrics.get('loss'))}")
        elif ev.kind == "epoch_end" and self.overall is not None:
            self.done_epochs += 1
            self.auc = ev.metrics.get("val_auc", float("nan"))
            info = f"member {ev.member + 1}/{ev.n_members} val AUC {_fmt(self.auc)}"
            p.update(self.overall, completed=self.done_epochs, info=info)
        elif ev.kind == "member_end" and self.overall is not None:
            # Epochs skipped by early stopping count as done, so the ETA stays honest.
            self.done_epochs = self._member_base + self._member_epochs
            p.update(self.overall, completed=self.done_epochs)
        elif ev.kind == "done":
            p.console.print(f"[bold green]wrote[/] {ev.message}")

    def close(self) -> None:
        """Stop the live display."""
        self.progress.stop()


def _summary(console: Console, path: Path) -> None:
    from osteoscan.package import read_manifest

    m = read_manifest(path)
    t = Table(title=f"model {m.name} {m.version}: held-out metrics", title_justify="left")
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
        t.add_row(title, _fmt(cells[0]), ci, *(_fmt(c) for c in cells[1:]))
    console.print(t)
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


def register(app: typer.Typer) -> None:
    """Add the `train` command to the app."""

    @app.command("train")
    def train_cmd(
        ctx: typer.Context,
        data: Annotated[
            Path,
            typer.Option(
                "--data", help="Folder with one sub-folder per class, or a path,label[,group] CSV."
            ),
        ],
        out: Annotated[Path, typer.Option("--out", help="Folder to write the model package to.")],
        arch: Annotated[
            list[str] | None,
            typer.Option(
                "--arch", help="Architecture (repeat for an ensemble across architectures)."
            ),
        ] = None,
        preset: Annotated[
            str, typer.Option("--preset", help=f"Recipe preset: {', '.join(list_presets())}.")
        ] = "default",
        folds: Annotated[
            int | None,
            typer.Option(
                "--folds",
                help="K-fold cross-validation (fold models = members); 1 = train/val/test split.",
            ),
        ] = None,
        epochs: Annotated[
            int | None, typer.Option("--epochs", help="Maximum epochs per member (both stages).")
        ] = None,
        stage1_epochs: Annotated[
            int | None,
            typer.Option(
                "--stage1-epochs",
                help="Epochs training the new head on a frozen backbone (0: one stage).",
            ),
        ] = None,
        unfreeze_blocks: Annotated[
            int | None,
            typer.Option("--unfreeze-blocks", help="Top blocks unfrozen in stage 2 (-1: all)."),
        ] = None,
        lr: Annotated[
            float | None,
            typer.Option("--lr", help="Learning rate of stage 1 (or of single-stage training)."),
        ] = None,
        lr_stage2: Annotated[
            float | None, typer.Option("--lr-stage2", help="Learning rate of stage 2.")
        ] = None,
        optimizer: Annotated[
            str | None, typer.Option("--optimizer", help="adam, adamw, rmsprop or sgd.")
        ] = None,
        schedule: Annotated[
            str | None, typer.Option("--schedule", help="cosine, plateau or none.")
        ] = None,
        patience: Annotated[
            int | None,
            typer.Option("--patience", help="Early stopping: epochs without validation-AUC gain."),
        ] = None,
        augment: Annotated[
            bool | None, typer.Option("--augment/--no-augment", help="Random affine augmentation.")
        ] = None,
        positive: Annotated[
            str | None,
            typer.Option(
                "--positive",
                help="Screening-positive classes, comma-separated (default osteoporosis).",
            ),
        ] = None,
        target_sensitivity: Annotated[
            float | None,
            typer.Option(
                "--target-sensitivity",
                help="Sensitivity the stored threshold reaches on held-out data.",
            ),
        ] = None,
        covariates: Annotated[
            Path | None,
            typer.Option("--covariates", help="CSV with path (or file stem), age, sex per image."),
        ] = None,
        covariate_columns: Annotated[
            str | None,
            typer.Option(
                "--covariate-columns", help="Column names in the covariates CSV: path,age,sex."
            ),
        ] = None,
        device: Annotated[
            str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")
        ] = "auto",
        seed: Annotated[
            int | None,
            typer.Option("--seed", help="Random seed (splits, initialisation, augmentation)."),
        ] = None,
        weights: Annotated[
            Path | None,
            typer.Option(
                "--weights", help="ImageNet weights file (.safetensors/.pth) for the architecture."
            ),
        ] = None,
        random_init: Annotated[
            bool,
            typer.Option(
                "--random-init", help="Train from random initialisation (no pretrained weights)."
            ),
        ] = False,
        size: Annotated[int | None, typer.Option("--size", help="Input size in pixels.")] = None,
        roi: Annotated[
            str | None,
            typer.Option(
                "--roi",
                help="Region fed to the model: none (whole image), knee_joint (one crop around "
                "the joints) or knee_pair (each knee joint in its own square, side by side).",
            ),
        ] = None,
        clahe: Annotated[
            bool | None,
            typer.Option("--clahe/--no-clahe", help="CLAHE contrast equalisation of the input."),
        ] = None,
        method: Annotated[
            str | None,
            typer.Option(
                "--method",
                help="finetune (two-stage fine-tuning) or probe (frozen backbone + regularised "
                "logistic head: better on a few hundred images).",
            ),
        ] = None,
        probe_c: Annotated[
            float | None, typer.Option("--probe-c", help="Probe: inverse L2 strength.")
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", help="Training batch size.")
        ] = None,
        name: Annotated[
            str | None, typer.Option("--name", help="Model name (default: the --out folder name).")
        ] = None,
        body_part: Annotated[
            str, typer.Option("--body-part", help="Body part the model serves: knee or spine.")
        ] = "knee",
        cache_dir: Annotated[
            Path | None,
            typer.Option("--cache-dir", help="Keep preprocessed images here between runs."),
        ] = None,
        threads: Annotated[
            int | None, typer.Option("--threads", help="CPU threads for torch.")
        ] = None,
        quiet: Annotated[
            bool, typer.Option("--quiet", "-q", help="Plain log lines instead of live progress.")
        ] = False,
    ) -> None:
        """Fine-tune a calibrated CNN ensemble on labelled radiographs and write a model package."""
        if body_part not in ("knee", "spine"):
            raise UsageError("--body-part must be knee or spine")
        if random_init and weights is not None:
            raise UsageError("--random-init and --weights exclude each other")
        cols = _csv_list(covariate_columns)
        if cols is not None and len(cols) != 3:
            raise UsageError("--covariate-columns needs three names: path,age,sex")
        pre: dict[str, Any] = {}
        if roi is not None:
            pre["roi"] = roi
        if clahe is not None:
            pre["clahe"] = clahe
        over: dict[str, Any] = {
            "data": data, "out": out, "archs": tuple(arch) if arch else None, "folds": folds,
            "epochs": epochs, "stage1_epochs": stage1_epochs, "unfreeze_blocks": unfreeze_blocks,
            "lr": lr, "lr_stage2": lr_stage2, "optimizer": optimizer, "schedule": schedule,
            "patience": patience, "positive": _csv_list(positive),
            "target_sensitivity": target_sensitivity, "covariates_csv": covariates,
            "covariate_columns": cols, "device": device, "seed": seed, "weights": weights,
            "random_init": random_init or None, "size": size, "batch_size": batch_size,
            "name": name or out.name, "body_parts": (body_part,), "cache_dir": cache_dir,
            "num_threads": threads, "preprocess": pre or None, "command": _command_line(ctx),
            "method": method, "probe_c": probe_c,
        }  # fmt: skip
        cfg = make_config(preset, **over)
        if augment is not None:
            cfg.augment.enabled = augment
        if not data.exists():
            raise UsageError(f"--data {data}: no such file or folder")
        console = Console(stderr=True)
        renderer = (
            LogRenderer(console) if quiet or not console.is_terminal else RichRenderer(console)
        )
        from osteoscan.train.trainer import train  # heavy imports only when running

        t0 = time.perf_counter()
        try:
            path = train(cfg, progress=renderer)
        finally:
            renderer.close()
        _summary(Console(), path)
        console.print(f"trained in {time.perf_counter() - t0:.1f} s → {path}", highlight=False)
