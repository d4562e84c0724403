"""`osteoscan evaluate`: score labelled images with a model package; print and save metrics.

Thin: :func:`osteoscan.evaluate.evaluate_model` does the work; this module parses and renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from osteoscan.atomic import write_text
from osteoscan.cli.train_render import report_console
from osteoscan.errors import UsageError

VARIANT_TITLES = {
    "image_only": "image only",
    "covariates_only": "covariates only (age, sex)",
    "combined": "image + covariates (as scanned)",
}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a killed run never leaves a half-written report."""
    write_text(path, json.dumps(payload, indent=2) + "\n")


def _table(title: str, metrics: dict[str, Any]) -> Group:
    from osteoscan.metrics import format_metrics_table  # numpy: not for `--help`

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95 % CI", justify="right")
    for row in format_metrics_table(metrics):
        table.add_row(*row)
    return Group(Text(title), table)  # a table title would be padded with spaces


def _confusion(metrics: dict[str, Any], variant: str) -> Group:
    cm = metrics["confusion_matrix"]
    cols = ("grade from the cut-offs" if metrics.get("prediction_rule") == "grade_cutoffs"
            else "most probable class")  # fmt: skip
    title = f"confusion matrix, {variant} (rows: true, columns: {cols})"
    table = Table()
    table.add_column("")
    for c in cm["classes"]:
        table.add_column(c, justify="right")
    for c, row in zip(cm["classes"], cm["matrix"], strict=True):
        table.add_row(c, *(str(v) for v in row))
    return Group(Text(title), table)


def _print_notes(out: Console, report: dict[str, Any]) -> None:
    """Frames, covariate sources and every warning (training images, covariates CSV)."""
    d = report["data"]
    out.print(
        f"{d['n_frames']} frames: {d['n_scored']} scored, {d['n_skipped']} skipped, "
        f"{d['n_errors']} unreadable"
    )
    sources = report["covariates"]["sources"]
    out.print(
        f"age/sex for {sources['n_images']} images: {sources['from_header']} from DICOM headers, "
        f"{sources['from_csv']} from the covariates CSV, {sources['none']} none"
    )
    for text in report["warnings"]:
        out.print(f"[bold yellow]warning:[/bold yellow] {escape(text)}", soft_wrap=True)


def _evaluate(quiet: bool, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`osteoscan.evaluate.evaluate_model` with a progress bar on a terminal."""
    from osteoscan.evaluate import evaluate_model

    console = Console(stderr=True)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=quiet or not console.is_terminal) as bar:
        task = bar.add_task("scoring images", total=None)
        return evaluate_model(
            *args, **kwargs,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip


def _render(stdout: Console, report: dict[str, Any]) -> None:
    """The report for people: headline, notes and warnings, metric tables, files not scored."""
    m = report["model"]
    stdout.print(
        f"model {m['name']} {m['version']} · {report['data']['n_scored']} of "
        f"{report['data']['n_images']} images scored · threshold {report['threshold']:.3f}"
    )
    _print_notes(stdout, report)
    if report["class_mapping"]["mode"] != "direct":
        stdout.print(f"note: {report['class_mapping']['note']}")
    if report["covariates"]["model_uses"] and not report["covariates"]["n_fused"]:
        stdout.print(
            "note: no image had age/sex (DICOM header or --covariates): image-only scores, "
            "at the image-only threshold"
        )
    for name, metrics in report["variants"].items():
        stdout.print(_table(VARIANT_TITLES.get(name, name), metrics))
    stdout.print(_confusion(report, VARIANT_TITLES.get(report["primary"], report["primary"])))
    for status, word in (("errors", "unreadable"), ("skipped", "skipped")):
        for rec in report[status][:10]:
            frame = f" frame {rec['frame']}" if rec["frame"] else ""
            text = escape(f"{rec['path']}{frame}: {rec['reason']}")
            stdout.print(f"[yellow]{word}[/yellow] {text}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the app."""

    @app.command("evaluate")
    def evaluate(
        data: Annotated[
            Path,
            typer.Option(
                "--data", help="Folder with one sub-folder per class, or a path,label[,group] CSV."
            ),
        ],
        model: Annotated[
            str, typer.Option("--model", help="Model package name or folder.")
        ] = "knee-default",
        covariates: Annotated[
            Path | None, typer.Option("--covariates", help="Covariates CSV (path, age, sex).")
        ] = None,
        covariate_columns: Annotated[
            str,
            typer.Option(
                "--covariate-columns",
                help="Column names for path,age,sex in the covariates CSV, e.g. "
                "'Patient Id,Age,Gender'.",
            ),
        ] = "path,age,sex",
        out: Annotated[
            Path | None, typer.Option("--out", help="Write the full report as JSON here.")
        ] = None,
        device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
        n_boot: Annotated[
            int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95 % CIs.")
        ] = 1000,
        seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
        body_part: Annotated[
            str,
            typer.Option(
                "--body-part",
                help="Body part of files that state none: auto (the part the model serves), "
                "knee or spine; as in scan.",
            ),
        ] = "auto",
        quiet: Annotated[
            bool, typer.Option("--quiet", "-q", help="No progress bar.", metavar="")
        ] = False,
    ) -> None:
        """Score labelled images with a model and report metrics with 95 % intervals."""
        cols = [c.strip() for c in covariate_columns.split(",")]
        if len(cols) != 3 or not all(cols):
            raise UsageError("--covariate-columns needs three comma-separated names: path,age,sex")
        report = _evaluate(
            quiet, data, model, covariates_csv=covariates, covariate_columns=cols, device=device,
            batch_size=batch_size, n_boot=n_boot, seed=seed, body_part=body_part,
        )  # fmt: skip
        stdout = report_console()
        _render(stdout, report)
        if out is not None:
            _write_json(out, report)
            stdout.print(f"report written to {out}")
