"""`osteoscan inspect PATH... [--json] [--export DIR]`: what the model would see, and why."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from osteoscan.errors import UsageError

if TYPE_CHECKING:
    from osteoscan.discover import Found

# PreprocessConfig().size (a test keeps them equal); a literal because osteoscan.preprocess
# imports torch and OpenCV, which `osteoscan --help` must not pay for.
DEFAULT_SIZE = 320

_STATUS_STYLE = {"ok": "green", "skipped": "yellow", "error": "red"}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if value != int(value) else str(int(value))
    return str(value)


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_lines=False, header_style="bold", expand=False)
    for name in ("path", "frame", "status", "reason", "kind", "body part", "age", "sex"):
        table.add_column(name, overflow="fold")
    for name in ("modality", "photometric", "transfer syntax", "bits", "size"):
        table.add_column(name, overflow="fold")
    for row in rows:
        part = row["body_part"] or "unknown"
        if row.get("body_part_reason"):
            part = f"{part} ({row['body_part_reason']})"
        size = f"{row['columns']}x{row['rows']}" if row.get("rows") else ""
        table.add_row(
            row["path"],
            str(row["frame"]),
            Text(row["status"], style=_STATUS_STYLE.get(row["status"], "")),
            row["reason"] or "",
            row["kind"] or "",
            part,
            _fmt(row["age"]),
            _fmt(row["sex"]),
            _fmt(row["modality"]),
            _fmt(row["photometric"]),
            _fmt(row["transfer_syntax"]),
            _fmt(row["bits_stored"]),
            size,
        )
    return table


def _summary(rows_by_status: dict[str, int], ignored: list[Found]) -> str:
    total = sum(rows_by_status.values())
    parts = ", ".join(f"{n} {s}" for s, n in rows_by_status.items() if n)
    text = f"{total} frame(s)" + (f": {parts}" if parts else "")
    return text + f"; {len(ignored)} file(s) or folder(s) ignored"


def register(app: typer.Typer) -> None:
    """Add the `inspect` command to the app."""

    @app.command("inspect")
    def inspect_cmd(
        paths: Annotated[
            list[Path],
            typer.Argument(
                metavar="PATH...", help="Files or folders to inspect (walked recursively)."
            ),
        ],
        json_lines: Annotated[
            bool, typer.Option("--json", help="One JSON object per image frame on stdout.")
        ] = False,
        export: Annotated[
            Path | None,
            typer.Option(
                "--export",
                metavar="DIR",
                help="Write each readable frame's model input (16-bit PNG) into DIR.",
            ),
        ] = None,
        include: Annotated[
            list[str] | None,
            typer.Option("--include", metavar="GLOB", help="Only files matching (repeatable)."),
        ] = None,
        exclude: Annotated[
            list[str] | None,
            typer.Option("--exclude", metavar="GLOB", help="Skip files/folders matching."),
        ] = None,
        size: Annotated[
            int, typer.Option("--size", min=16, max=4096, help="Exported image size in pixels.")
        ] = DEFAULT_SIZE,
        show_ignored: Annotated[
            bool,
            typer.Option("--show-ignored", help="Also list ignored files and why (on stderr)."),
        ] = False,
    ) -> None:
        """What the model would see, and why: kind, status, header facts per image frame.

        Broken files are rows with status=error (exit code 0); a missing PATH is a usage error.
        """
        from osteoscan.inspect import inspect_paths
        from osteoscan.preprocess import PreprocessConfig

        missing = [str(p) for p in paths if not p.exists() and not p.is_symlink()]
        if missing:
            raise UsageError(f"no such file or folder: {', '.join(missing)}")
        err = Console(stderr=True)
        ignored: list[Found] = []
        counts = {"ok": 0, "skipped": 0, "error": 0}
        rows_seen: list[dict[str, Any]] = []
        records = inspect_paths(
            paths,
            export_dir=export,
            cfg=PreprocessConfig(size=size),
            include=include or (),
            exclude=exclude or (),
            on_ignored=ignored.append,
        )
        for row in records:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            if json_lines:
                # Streamed so a long walk shows progress and a pipe consumer can start at once.
                try:
                    sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                except BrokenPipeError:
                    # `osteoscan inspect DIR --json | head`: the reader left; stop quietly.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    raise typer.Exit(0) from None
            else:
                rows_seen.append(row)
        if not json_lines:
            Console().print(_table(rows_seen))
        if show_ignored:
            for found in ignored:
                err.print(f"ignored {found.path}: {found.reason}", markup=False, highlight=False)
        err.print(_summary(counts, ignored), markup=False, highlight=False)
