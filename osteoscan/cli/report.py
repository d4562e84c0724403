"""``osteoscan report``: parse options, call :func:`osteoscan.review.write_report`, say where."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `report` command to the app."""

    @app.command("report")
    def report(
        results: Annotated[
            Path, typer.Argument(metavar="RESULTS.csv", help="Results CSV written by `scan`.")
        ],
        html: Annotated[
            Path,
            typer.Option(
                "--html",
                metavar="FILE",
                help="Review page to write; plots, thumbnails and further pages go to "
                "<FILE stem>_files/ beside it.",
            ),
        ],
        state: Annotated[
            Path | None,
            typer.Option(
                metavar="FILE",
                help="Scan state, read only, for the per-night trend "
                "(default: <results stem>.state.sqlite when present).",
            ),
        ] = None,
        heatmaps: Annotated[
            Path | None,
            typer.Option(
                "--heatmaps",
                metavar="DIR",
                help="The scan's --heatmaps folder (default: the heatmap column of each row).",
            ),
        ] = None,
        page_size: Annotated[int, typer.Option(metavar="N", help="Flagged images per page.")] = 200,
    ) -> None:
        """Write the morning review page: flagged images with heatmaps, plots, problems."""
        from osteoscan.review import write_report

        done = write_report(results, html, state=state, heatmaps=heatmaps, page_size=page_size)
        typer.echo(
            f"review page: {done.html} ({done.rows} rows, {done.flagged} flagged on "
            f"{done.pages} page(s), {done.thumbnails} thumbnails; {done.seconds:.1f} s)"
        )
