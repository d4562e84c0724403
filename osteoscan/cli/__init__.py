"""The ``osteoscan`` command line: parse options, call the library, render.

Each command lives in its own module with a ``register(app)`` function. Domain errors become exit
codes here and only here: :class:`~osteoscan.errors.OsteoscanError` → its ``exit_code`` (1 run
failed, 2 usage).
"""

from __future__ import annotations

import sys

import typer

from osteoscan import __version__
from osteoscan.cli import bench, evaluate, inspect, models, report, scan, train
from osteoscan.errors import OsteoscanError
from osteoscan.inert import log_safe

app = typer.Typer(
    name="osteoscan",
    help="Batch screening of knee and spine radiographs for low bone density. "
    "Research software: not for clinical use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"osteoscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        metavar="",
        help="Print the version and exit.",
    ),
) -> None:
    """osteoscan: screen radiograph archives for osteoporosis (research use only)."""


for _module in (scan, train, evaluate, inspect, models, bench, report):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; maps domain errors to exit codes."""
    try:
        app(args=argv, prog_name="osteoscan", standalone_mode=True)
    except OsteoscanError as exc:
        typer.echo(f"osteoscan: error: {log_safe(str(exc))}", err=True)  # names stay text
        sys.exit(exc.exit_code)
