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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from osteoscan.discover import Found
from osteoscan.frames import ImageFrame
from osteoscan.preprocess import PreprocessConfig, preprocess
from osteoscan.runtime import worker_init
from osteoscan.scan.routing import Router

Reader = Callable[..., list[ImageFrame]]


@dataclass
class FrameRecord:
    """One row-to-be: frame metadata, its route and (when it will be scored) its model input."""

    path: str
    root: str
    frame: int
    status: str
    reason: str
    kind: str
    image_id: str
    body_part: str
    age: float | None
    sex: str | None
    package: int | None = None  # index of the scoring package; None → not scored
    pixels: np.ndarray | None = None  # uint16 (S, S) model input, only when package is set
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FrameBatch:
    """A collated batch: all records in order, and per package the stacked model inputs.

    ``pixels[p]`` is uint16 (K, 1, H, W); ``rows[p]`` are the indices into ``records`` of its K
    frames, in order. ``n_files`` counts the files the batch came from.
    """

    records: list[FrameRecord]
    pixels: dict[int, torch.Tensor]
    rows: dict[int, list[int]]
    n_files: int

    def pin_memory(self) -> FrameBatch:
        """Called by the DataLoader when ``pin_memory=True`` (CUDA): pin only the pixel tensors."""
        self.pixels = {p: t.pin_memory() for p, t in self.pixels.items()}
        return self


def _default_reader() -> Reader:
    from osteoscan.readers import read_frames

    return read_frames


def _error(found: Found, reason: str) -> FrameRecord:
    return FrameRecord(
        path=str(found.path), root=str(found.root), frame=0, status="error", reason=reason,
        kind=found.kind, image_id="", body_part="unknown", age=None, sex=None,
    )  # fmt: skip


class ScanDataset(Dataset):
    """Map-style dataset over discovered files (``ignored`` entries must be filtered out first).

    ``preprocess_cfgs[p]`` is the preprocessing of package ``p``; ``router`` picks the package per
    frame. ``reader`` defaults to :func:`osteoscan.readers.read_frames` (pass a guarded reader to
    add per-file limits).
    """

    def __init__(
        self,
        files: Sequence[Found],
        router: Router,
        preprocess_cfgs: Sequence[PreprocessConfig],
        reader: Reader | None = None,
    ) -> None:
        self.files = list(files)
        self.router = router
        self.cfgs = list(preprocess_cfgs)
        self.reader = reader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> list[FrameRecord]:
        found = self.files[index]
        if found.kind == "broken":
            return [_error(found, found.reason or "not a readable image file")]
        try:
            reader = self.reader or _default_reader()
            frames = reader(found.path, found.kind)
        except Exception as exc:  # noqa: BLE001 - readers must not raise; if one does, it's a row
            return [_error(found, f"unreadable: {type(exc).__name__}: {exc}")]
        if not frames:
            return [_error(found, "the file holds no image frame")]
        return [self._record(found, fr) for fr in frames]

    def _record(self, found: Found, fr: ImageFrame) -> FrameRecord:
        rec = FrameRecord(
            path=str(found.path), root=str(found.root), frame=int(fr.frame), status=fr.status,
            reason=fr.reason, kind=fr.kind or found.kind, image_id=fr.image_id,
            body_part=fr.body_part, age=fr.age, sex=fr.sex,
            info={k: fr.info.get(k) for k in ("modality", "transfer_syntax") if k in fr.info},
        )  # fmt: skip
        if fr.status != "ok":
            return rec
        if fr.image is None:
            rec.status, rec.reason = "error", "the reader returned no pixels"
            return rec
        route = self.router.route(fr)
        rec.body_part = route.body_part
        if route.package is None:
            rec.status, rec.reason = "skipped", route.reason
            return rec
        try:
            rec.pixels = preprocess(fr.image, self.cfgs[route.package])
        except Exception as exc:  # noqa: BLE001 - an odd image becomes an error row
            rec.status, rec.reason = "error", f"preprocessing failed: {type(exc).__name__}: {exc}"
            return rec
        rec.package = route.package
        return rec


def collate_frames(items: Sequence[list[FrameRecord]]) -> FrameBatch:
    """Flatten per-file record lists; stack each package's pixels as uint16 (K, 1, H, W)."""
    records: list[FrameRecord] = [rec for item in items for rec in item]
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
