"""`osteoscan inspect PATH... [--json] [--export DIR]`: what the model would see, and why.

File names and header values are hostile data, shown as inert text: the terminal table shows
them without Rich markup and with control characters as visible escapes; plain lines are TSV cells
made inert (:func:`osteoscan.inert.csv_cell`: escapes, a few KB at most, a leading ``'`` before a
formula); ``--json`` escapes what JSON itself would leave raw (DEL, C1 controls, bidi overrides,
undecodable bytes of a file name).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from osteoscan.errors import UsageError
from osteoscan.inert import csv_cell, log_safe

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


# (header, cell) per column: the same columns in the terminal table and in the plain lines.
def _cells(row: dict[str, Any]) -> list[str]:
    part = row["body_part"] or "unknown"
    if row.get("body_part_reason"):
        part = f"{part} ({row['body_part_reason']})"
    size = f"{row['columns']}x{row['rows']}" if row.get("rows") else ""
    # ok frames have no reason: show why the gate let them through instead
    why = row["reason"] or row.get("gate_reason") or ""
    return [
        row["path"], str(row["frame"]), row["status"], row.get("gate") or "", why,
        row["kind"] or "", part, _fmt(row["age"]), _fmt(row["sex"]), _fmt(row["modality"]),
        _fmt(row["photometric"]), _fmt(row["transfer_syntax"]), _fmt(row["bits_stored"]), size,
    ]  # fmt: skip


COLUMNS = (
    "path", "frame", "status", "gate", "reason", "kind", "body part", "age", "sex", "modality",
    "photometric", "transfer syntax", "bits", "size",
)  # fmt: skip


# Terminal table: short columns keep their full width; path and reason share the rest.
_TERMINAL = (("path", 2), ("frame", 0), ("status", 0), ("reason", 3), ("body part", 0),
             ("age", 0), ("sex", 0), ("modality", 0), ("size", 0))  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> Table:
    """One line per frame on a terminal: long cells end in '…' rather than wrap (``--json`` and
    plain output keep everything)."""
    index = {name: i for i, name in enumerate(COLUMNS)}
    body = [_cells(row) for row in rows]
    for cells, row in zip(body, rows, strict=True):
        cells[index["body part"]] = row["body_part"] or "unknown"
    table = Table(header_style="bold", expand=True, box=None, padding=(0, 1))
    for name, ratio in _TERMINAL:
        width = max([len(name)] + [len(c[index[name]]) for c in body])
        table.add_column(
            name, no_wrap=True, overflow="ellipsis", ratio=ratio or None,
            min_width=None if ratio else width,
        )  # fmt: skip
    for cells, row in zip(body, rows, strict=True):
        # Text, not str: a file name with "[bold]" or "[link=…]" must not be read as markup
        shown: list[str | Text] = [Text(log_safe(cells[index[name]])) for name, _ in _TERMINAL]
        shown[2] = Text(row["status"], style=_STATUS_STYLE.get(row["status"], ""))
        table.add_row(*shown)
    return table


def plain_line(row: dict[str, Any]) -> str:
    """One tab-separated line per frame, not cut to the console: what logs and pipes get.

    Each cell is inert (tabs and newlines inside it become visible escapes, a formula gets a
    leading ``'``, at most a few KB).
    """
    return "\t".join(csv_cell(c) for c in _cells(row))


# What json.dumps(ensure_ascii=False) leaves raw but a terminal may act on; these can only
# occur inside JSON strings, where a \uXXXX escape is valid and reads back as the same text.
_JSON_RAW = re.compile("[\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def json_line(row: dict[str, Any]) -> str:
    """One JSON object per frame, with every character a terminal could act on escaped."""
    text = json.dumps(row, ensure_ascii=False)
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


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
        """What the model would see, and why: one line per image frame.

        Status and reason as a scan gives them (only projection radiographs are scored: the gate
        column says why a frame passed or not), body part and how it was decided, header facts.
        Tab-separated plain lines when the output is not a terminal. Broken files are rows with
        status=error (exit code 0); a missing PATH is a usage error.
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
                    sys.stdout.write(json_line(row) + "\n")
                    sys.stdout.flush()
                except BrokenPipeError:
                    # `osteoscan inspect DIR --json | head`: the reader left; stop quietly.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    raise typer.Exit(0) from None
            else:
                rows_seen.append(row)
        if not json_lines:
            out = Console()
            if out.is_terminal:
                out.print(_table(rows_seen))
            else:
                # Logs and pipes: plain lines, never cut at the console width.
                sys.stdout.write("\t".join(COLUMNS) + "\n")
                sys.stdout.writelines(plain_line(row) + "\n" for row in rows_seen)
                sys.stdout.flush()
        if show_ignored:
            for found in ignored:
                err.print(log_safe(f"ignored {found.path}: {found.reason}"), markup=False,
                          highlight=False)  # fmt: skip
        err.print(_summary(counts, ignored), markup=False, highlight=False)
