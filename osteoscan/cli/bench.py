"""`osteoscan bench` (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `bench` command to the app."""

    @app.command("bench", help="(not implemented yet)")
    def _cmd() -> None:
        typer.echo("osteoscan bench: not implemented yet", err=True)
        raise typer.Exit(2)
