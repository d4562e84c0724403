"""`osteoscan scan` (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `scan` command to the app."""

    @app.command("scan", help="(not implemented yet)")
    def _cmd() -> None:
        typer.echo("osteoscan scan: not implemented yet", err=True)
        raise typer.Exit(2)
