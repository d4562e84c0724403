"""``osteoscan bench``: stage-by-stage throughput in one run (see :mod:`osteoscan.bench`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `bench` command to the app."""

    @app.command("bench")
    def bench(
        paths: Annotated[
            list[Path] | None,
            typer.Argument(help="Images to time (default: synthetic 1024-px knee JPEGs)."),
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", "-m", help="Model package name or folder.")
        ] = None,
        arch: Annotated[
            str | None,
            typer.Option(help="Time an untrained architecture instead of a package."),
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
        batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 32,
        workers: Annotated[int | None, typer.Option(help="Reader processes.")] = None,
        n_images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = 160,
        image_size: Annotated[int, typer.Option(help="Synthetic image size (px).")] = 1024,
        model_size: Annotated[int, typer.Option(help="Input size with --arch (px).")] = 256,
        seconds: Annotated[float, typer.Option(help="Minimum seconds per model stage.")] = 3.0,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ) -> None:
        """Measure read, model, model+heatmaps and end-to-end throughput; name the bottleneck."""
        from osteoscan.bench import run_bench

        res = run_bench(
            paths=list(paths or []), model=model, arch=arch, device=device,
            batch_size=batch_size, workers=workers, n_images=n_images, image_size=image_size,
            model_size=model_size, min_seconds=seconds,
        )  # fmt: skip
        if as_json:
            typer.echo(json.dumps(res))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"osteoscan bench — {res['model']} on {res['device']}")
        t.add_column("stage")
        t.add_column("images/s", justify="right")
        t.add_row("read + preprocess (1 worker)", f"{res['read_ips_per_worker']:.1f}")
        t.add_row(f"read + preprocess ({res['workers']} workers)", f"{res['read_ips']:.1f}")
        t.add_row(f"model (batch {res['batch_size']})", f"{res['model_ips']:.1f}")
        t.add_row("model + heatmaps", f"{res['model_heatmap_ips']:.1f}")
        t.add_row("end to end", f"{res['end_to_end_ips']:.1f}")
        console = Console()
        console.print(t)
        console.print(
            f"limiting stage: [bold]{res['limiting_stage']}[/]; end to end is "
            f"{100 * res['end_to_end_vs_limiting']:.0f}% of it; heatmaps cost "
            f"{res['heatmap_cost']:.2f}x the model time"
        )
