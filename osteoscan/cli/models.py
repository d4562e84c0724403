"""`osteoscan models` (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `models` command to the app."""

    @app.command("models", help="(not implemented yet)")
    def _cmd() -> None:
        typer.echo("osteoscan models: not implemented yet", err=True)
        raise typer.Exit(2)
