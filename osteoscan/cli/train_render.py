"""Render ``osteoscan train`` progress events: live Rich bars on a terminal, log lines otherwise.

The training core reports :class:`~osteoscan.train.loop.TrainEvent` objects; :class:`LogRenderer`
writes plain timestamped lines (cron logs, pipes, ``--quiet``), :class:`RichRenderer` live bars
with the ETA and the current validation AUC.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from osteoscan.rows import utc_now

if TYPE_CHECKING:  # the training loop imports torch: only when `train` runs
    from osteoscan.train.loop import TrainEvent


def fmt(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals, or ``n/a`` when it is not a finite float."""
    return f"{x:.{digits}f}" if isinstance(x, float) and math.isfinite(x) else "n/a"


def _rates(m: dict[str, Any]) -> str:
    """``, train 17.2 img/s, val 51.0 img/s`` from an epoch's metrics (empty when absent)."""
    parts = [f"{k} {m[f'{k}_img_s']:.1f} img/s" for k in ("train", "val") if m.get(f"{k}_img_s")]
    return "".join(f", {p}" for p in parts)


class LogRenderer:
    """Plain timestamped lines (cron logs, pipes, ``--quiet``)."""

    def __init__(
        self, console: Console, read_every: float = 10.0, batch_every: float = 30.0
    ) -> None:
        self.console, self.read_every, self._last = console, read_every, 0.0
        self.batch_every = batch_every  # an epoch can take minutes: say how far it is

    def _line(self, text: str) -> None:
        self.console.print(f"{utc_now()} osteoscan train: {text}", markup=False, highlight=False,
                           soft_wrap=True)  # fmt: skip

    def __call__(self, ev: TrainEvent) -> None:
        m = ev.metrics
        if ev.kind in ("phase", "done", "warning"):
            prefix = {"done": "wrote ", "warning": "warning: "}.get(ev.kind, "")
            self._line(prefix + ev.message)
        elif ev.kind == "read":
            # Files read so far; the phase line after reading says how many were usable.
            now = time.monotonic()
            if ev.step == ev.n_steps or now - self._last >= self.read_every:
                self._last = now
                self._line(f"reading files: {ev.step}/{ev.n_steps} done")
        elif ev.kind == "member_start":
            self._line(
                f"member {ev.member + 1}/{ev.n_members}: training ({ev.n_epochs} epochs max)"
            )
        elif ev.kind == "epoch_end":
            self._line(
                f"member {ev.member + 1}/{ev.n_members} epoch {ev.epoch}/{ev.n_epochs} "
                f"[{ev.stage}] train_loss {fmt(m.get('train_loss'))} val_loss "
                f"{fmt(m.get('val_loss'))} val_auc {fmt(m.get('val_auc'))} "
                f"({m.get('seconds', 0.0):.1f} s{_rates(m)}){' *' if m.get('best') else ''}"
            )
        elif ev.kind == "epoch_start":
            self._last = time.monotonic()
        elif ev.kind == "batch":
            now = time.monotonic()
            if now - self._last >= self.batch_every:
                self._last = now
                self._line(
                    f"member {ev.member + 1}/{ev.n_members} epoch {ev.epoch} [{ev.stage}]: "
                    f"batch {ev.step}/{ev.n_steps}, loss {fmt(m.get('loss'))}"
                )
        elif ev.kind == "progress":
            now = time.monotonic()
            if ev.step == ev.n_steps or now - self._last >= self.read_every:
                self._last = now
                self._line(f"{ev.message}: {ev.step}/{ev.n_steps} images")
        elif ev.kind == "member_end":
            self._line(
                f"member {ev.member + 1}/{ev.n_members} done: best epoch {m.get('best_epoch')}, "
                f"val_auc {fmt(m.get('best_val_auc'))}"
            )

    def close(self) -> None:
        """Nothing to tear down."""


class RichRenderer:
    """Live bars: overall epochs (with ETA and current val AUC) and batches of the epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.overall: TaskID | None = None
        self.batches: TaskID | None = None
        self.read: TaskID | None = None
        self.forward: TaskID | None = None
        self._forward_what = ""
        self.done_epochs = 0
        self.auc = float("nan")
        self._member_epochs = 0
        self._member_base = 0
        self.progress.start()

    def __call__(self, ev: TrainEvent) -> None:
        p = self.progress
        if ev.kind == "phase":
            p.console.print(f"[bold]·[/] {escape(ev.message)}")
        elif ev.kind == "warning":
            p.console.print(f"[bold yellow]warning:[/] {escape(ev.message)}")
        elif ev.kind == "read":
            if self.read is None:
                self.read = p.add_task("read", total=ev.n_steps, info="files")
            p.update(self.read, completed=ev.step)
        elif ev.kind == "progress":
            if self.forward is None:
                self.forward = p.add_task("forward", total=max(ev.n_steps, 1), info="")
            if ev.step <= 0 or ev.message != self._forward_what:
                self._forward_what = ev.message
                p.reset(self.forward, total=max(ev.n_steps, 1))
            p.update(self.forward, completed=ev.step, info=ev.message)
        elif ev.kind == "member_start":
            if self.overall is None:
                # Upper bound: early stopping usually ends members sooner (ETA is pessimistic).
                self.overall = p.add_task("epochs", total=ev.n_members * ev.n_epochs, info="")
                self.batches = p.add_task("batches", total=1, info="")
            self._member_epochs = ev.n_epochs
            self._member_base = self.done_epochs
        elif ev.kind == "epoch_start" and self.batches is not None:
            p.reset(self.batches, total=max(ev.n_steps, 1))
            p.update(self.batches, info=f"member {ev.member + 1}/{ev.n_members} [{ev.stage}]")
        elif ev.kind == "batch" and self.batches is not None:
            p.update(self.batches, completed=ev.step, info=f"loss {fmt(ev.metrics.get('loss'))}")
        elif ev.kind == "epoch_end" and self.overall is not None:
            self.done_epochs += 1
            self.auc = ev.metrics.get("val_auc", float("nan"))
            info = f"member {ev.member + 1}/{ev.n_members} val AUC {fmt(self.auc)}"
            info += _rates(ev.metrics)
            self._forward_what = ""  # the next forward pass starts its bar afresh
            p.update(self.overall, completed=self.done_epochs, info=info)
        elif ev.kind == "member_end" and self.overall is not None:
            # Epochs skipped by early stopping count as done, so the ETA stays honest.
            self.done_epochs = self._member_base + self._member_epochs
            p.update(self.overall, completed=self.done_epochs)
        elif ev.kind == "done":
            p.console.print(f"[bold green]wrote[/] {ev.message}")

    def close(self) -> None:
        """Stop the live display."""
        self.progress.stop()


def report_console() -> Console:
    """Console for tables on stdout: a terminal's width, or unlimited when piped or logged, so a
    cron log never gets "specifici…" (tables stay as wide as their content)."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=1000)
