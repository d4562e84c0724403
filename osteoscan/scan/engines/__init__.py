"""Execution engines: how the load stage runs over many files and feeds the score stage.

An engine takes the files the plan stage chose and a :class:`~osteoscan.load.Loader`, and yields
:class:`~osteoscan.scan.batch.FrameBatch` objects in order; the orchestrator scores, records and
exports them. It owns everything about *where* loading runs (worker processes, restarts, per-file
watchdogs) and nothing about rows, state or outputs. :class:`~.local.LocalEngine` runs PyTorch
DataLoader workers on this machine; another engine (e.g. Ray Data) is an added module with the
same :class:`Engine` shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from osteoscan.discover import Found
from osteoscan.load import Loader
from osteoscan.scan.batch import FrameBatch


class Engine(Protocol):
    """Runs the load stage over ``files`` and yields collated batches in file order."""

    workers: int

    def batches(self, files: Sequence[Found], loader: Loader) -> Iterator[FrameBatch]:
        """Every file of ``files`` appears in exactly one batch (a file whose reader process
        died is yielded as an ``error`` record naming the crash)."""
        ...
