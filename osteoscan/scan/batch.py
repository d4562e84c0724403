"""Between the load and score stages: the records of a few files, with stacked model inputs.

:func:`collate_frames` flattens the load stage's per-file record lists and stacks the pixels of
each package into one ``uint16`` (K, 1, H, W) tensor: small integer tensors cross to the device,
normalisation happens there. Any engine (local DataLoader workers, Ray Data) hands the score
stage a :class:`FrameBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from osteoscan.load import LoadedFrame


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
