"""`osteoscan models [list | show NAME]`: the model packages osteoscan can find.

Thin: the library (:mod:`osteoscan.package`) finds and reads packages; this module renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from osteoscan.errors import OsteoscanError
from osteoscan.package import (
    list_packages,
    package_identity,
    read_manifest,
    resolve_package,
    search_dirs,
    verify_package,
)

models_app = typer.Typer(
    name="models",
    help="List the model packages osteoscan can find, or show one.",
    no_args_is_help=False,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        # Pipes, logs and tests: never fold paths; tables stay only as wide as their content.
        console = Console(highlight=False, width=1000)
    return console


def _headline(metrics: dict[str, Any]) -> str:
    """A short "ROC-AUC 0.84 [0.78, 0.90]" line from a manifest's metrics, when present.

    Trained packages hold one metrics dict per variant (combined, image_only, covariates_only):
    the headline is the variant that ``scan`` outputs, combined when there is one.
    """
    for variant in ("combined", "image_only"):
        if isinstance(metrics.get(variant), dict):
            metrics = metrics[variant]
            break
    auc = metrics.get("roc_auc")
    if isinstance(auc, dict) and "value" not in auc:
        auc = auc.get("positive") or auc.get("macro")
    if isinstance(auc, dict) and isinstance(auc.get("value"), int | float):
        ci = [c for c in (auc.get("ci95") or []) if isinstance(c, int | float)]
        tail = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if len(ci) == 2 else ""
        return f"ROC-AUC {auc['value']:.3f}{tail}"
    return ""


def _scalar(value: object) -> bool:
    return not isinstance(value, dict | list)


def _list() -> None:
    packages = list_packages()
    if not packages:
        where = ", ".join(str(d) for d in search_dirs())
        typer.echo(
            f"No model packages found (searched {where}). Train one with `osteoscan train`, "
            "or set OSTEOSCAN_MODELS to a folder holding packages."
        )
        return
    typer.echo("osteoscan model packages")  # not a table title: Rich pads titles with spaces
    table = Table()
    for col in ("name", "version", "classes", "body parts", "members", "threshold", "path"):
        table.add_column(col, overflow="fold")
    for path, m in packages:
        archs = ", ".join(sorted({s.arch for s in m.members}))
        table.add_row(
            m.name,
            m.version,
            ", ".join(m.classes),
            ", ".join(m.body_parts),
            f"{len(m.members)} ({archs})",
            f"{m.threshold:.3f}",
            str(path),
        )
    _console().print(table)


def _show(name: str, as_json: bool, verify: bool) -> None:
    try:
        path = resolve_package(name)
        manifest = read_manifest(path)
        if verify:
            verify_package(path, manifest)
    except OsteoscanError as exc:
        typer.echo(f"osteoscan: error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"path": str(path), **manifest.to_dict()}, indent=2))
        return
    m = manifest
    con = _console()
    card = Path(path) / "card.md"
    td = m.training_data
    rows = [
        ("name", f"{m.name} {m.version}"),
        ("path", str(path)),
        ("identity", package_identity(m)),
        ("classes", ", ".join(m.classes)),
        ("positive", ", ".join(m.positive_classes)),
        ("threshold", f"{m.threshold:.4f}"
         + (f" (target sensitivity {m.target_sensitivity})" if m.target_sensitivity else "")),
        ("body parts", ", ".join(m.body_parts)),
        ("covariates", ", ".join(m.covariates) or "none (image only)"),
        ("fusion", "yes" if m.fusion else "no"),
        ("preprocess", json.dumps(m.preprocess, sort_keys=True) if m.preprocess else "default"),
        ("training data", ", ".join(f"{k}={v}" for k, v in td.items() if _scalar(v))),
        ("metrics", _headline(m.metrics) or ("see manifest" if m.metrics else "none")),
        ("created", f"{m.created_at} by osteoscan {m.osteoscan_version}"),
        ("command", m.command),
        ("card", str(card) if card.is_file() else "none"),
        ("weights", "sha256 verified" if verify else "not verified (use --verify)"),
    ]  # fmt: skip
    # Plain "key  value" lines: a table grid would pad every line to the longest value (the
    # training command, ~250 characters) with trailing spaces.
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}".rstrip())
    typer.echo("members")  # not a table title: Rich pads titles to the table's width
    members = Table()
    for col in ("#", "arch", "input", "temperature", "fold", "dtype", "weights", "sha256"):
        members.add_column(col, overflow="fold")
    for i, s in enumerate(m.members):
        members.add_row(
            str(i), s.arch, str(s.input_size), f"{s.temperature:.3f}",
            "" if s.fold is None else str(s.fold), s.dtype, s.weights, s.sha256[:16],
        )  # fmt: skip
    con.print(members)


@models_app.callback()
def _models(ctx: typer.Context) -> None:
    """List the model packages osteoscan can find (``osteoscan models`` = ``models list``)."""
    if ctx.invoked_subcommand is None:
        _list()


@models_app.command("list")
def list_cmd() -> None:
    """Table of packages: name, version, classes, body parts, members, threshold, path."""
    _list()


@models_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Package name (see `osteoscan models`) or folder.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest as JSON.", metavar="")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Check every weights file against its sha256.", metavar=""),
    ] = False,
) -> None:
    """Manifest summary of one package, with the path of its model card."""
    _show(name, as_json, verify)


def register(app: typer.Typer) -> None:
    """Add the `models` command group to the app."""
    app.add_typer(models_app, name="models")
