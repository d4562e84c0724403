"""`osteoscan evaluate` (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the app."""

    @app.command("evaluate", help="(not implemented yet)")
    def _cmd() -> None:
        typer.echo("osteoscan evaluate: not implemented yet", err=True)
        raise typer.Exit(2)
