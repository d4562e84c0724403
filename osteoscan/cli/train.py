"""`osteoscan train` (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `train` command to the app."""

    @app.command("train", help="(not implemented yet)")
    def _cmd() -> None:
        typer.echo("osteoscan train: not implemented yet", err=True)
        raise typer.Exit(2)
