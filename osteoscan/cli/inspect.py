"""`osteoscan inspect` (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `inspect` command to the app."""

    @app.command("inspect", help="(not implemented yet)")
    def _cmd() -> None:
        typer.echo("osteoscan inspect: not implemented yet", err=True)
        raise typer.Exit(2)
