"""Read + preprocess discovered files in DataLoader workers; one item per file, frames flattened.

A worker turns one :class:`osteoscan.discover.Found` into a list of :class:`FrameRecord` — the
frame's metadata (no pixels of the original file) plus, for frames that will be scored, the
``uint16`` model input made by :func:`osteoscan.preprocess.preprocess` with the configuration of
the package that will score it (routing happens here, so only the right preprocessing runs).
Frames that are not ``ok`` (skipped, error, or no package for their body part) pass through as
metadata-only records. Nothing here raises for a bad file: one bad file never stops a batch.

:func:`collate_frames` flattens the records of a batch of files and stacks the pixels of each
package into one ``uint16`` (K, 1, H, W) tensor — small integer tensors cross to the device;
normalisation happens there.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from osteoscan.discover import Found
from osteoscan.load import LoadedFrame, Loader
from osteoscan.runtime import worker_init

FrameRecord = LoadedFrame  # a frame on its way from the load stage to the score stage


@dataclass
class FrameBatch:
    """A collated batch: all records in order, and per package the stacked model inputs.

    ``pixels[p]`` is uint16 (K, 1, H, W); ``rows[p]`` are the indices into ``records`` of its K
    frames, in order. ``n_files`` counts the files the batch came from.
    """

    records: list[LoadedFrame]
    pixels: dict[int, torch.Tensor]
    rows: dict[int, list[int]]
    n_files: int

    def pin_memory(self) -> FrameBatch:
        """Called by the DataLoader when ``pin_memory=True`` (CUDA): pin only the pixel tensors."""
        self.pixels = {p: t.pin_memory() for p, t in self.pixels.items()}
        return self


class ScanDataset(Dataset):
    """Map-style dataset over discovered files (``ignored`` entries must be filtered out first).

    Each item is the load stage (:class:`osteoscan.load.Loader`) applied to one file.
    """

    def __init__(self, files: Sequence[Found], loader: Loader) -> None:
        self.files = list(files)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> list[LoadedFrame]:
        found = self.files[index]
        if found.kind == "broken":
            return [_broken(found)]
        return self.loader(found.path, found.kind, found.root)


def _broken(found: Found) -> LoadedFrame:
    return LoadedFrame(
        path=str(found.path), root=str(found.root), frame=0, kind=found.kind, status="error",
        reason=found.reason or "not a readable image file",
    )  # fmt: skip


def collate_frames(items: Sequence[list[LoadedFrame]]) -> FrameBatch:
    """Flatten per-file record lists; stack each package's pixels as uint16 (K, 1, H, W)."""
    records: list[LoadedFrame] = [rec for item in items for rec in item]
    rows: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.package is not None and rec.pixels is not None:
            rows.setdefault(rec.package, []).append(i)
    pixels: dict[int, torch.Tensor] = {}
    for p, idx in rows.items():
        # Stack in NumPy: torch's uint16 support is partial, from_numpy of uint16 is fine.
        stacked = np.stack([records[i].pixels for i in idx])[:, None]  # type: ignore[misc]
        pixels[p] = torch.from_numpy(np.ascontiguousarray(stacked))
        for i in idx:
            records[i].pixels = None  # the tensor holds them now; do not ship them twice
    return FrameBatch(records, pixels, rows, len(items))


def worker_context() -> multiprocessing.context.BaseContext:
    """Start workers from a clean ``forkserver`` process, never by forking this one.

    Forking a process whose OpenCV (or OpenMP) thread pool has run copies the pool's locks in
    whatever state they were: the child then deadlocks in ``cv2.setNumThreads`` or the first
    parallel OpenCV call (seen here when a bench generated images before starting workers). The
    forkserver imports the reader stack once; each worker forks from it cheaply.

    Consequences, as with ``spawn``: the dataset's reader must be picklable, and a *script* that
    calls :func:`~osteoscan.scan.pipeline.run_scan` with workers must guard its entry point with
    ``if __name__ == "__main__":`` (workers import the main module). The CLI already does.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["osteoscan.scan.dataset", "osteoscan.readers"])
    return ctx


def make_loader(
    dataset: ScanDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    prefetch_factor: int = 2,
) -> DataLoader:
    """DataLoader over files in discovery order; pinned memory + persistent workers on CUDA."""
    cuda = device.type == "cuda"
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(
            worker_init_fn=worker_init,
            prefetch_factor=prefetch_factor,
            persistent_workers=cuda,
            multiprocessing_context=worker_context(),
        )
    return DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=max(0, int(workers)),
        collate_fn=collate_frames,
        pin_memory=cuda,
        **kwargs,
    )
