"""Read any supported file into :class:`~osteoscan.frames.ImageFrame` records.

``read_frames(path)`` is the one entry point: it sniffs the file kind by content (unless given),
dispatches to the DICOM or raster reader, and guarantees the contract every stage relies on —

- it never raises for a bad file: problems are frames with ``status="error"`` (or ``"skipped"``
  for non-image DICOM objects) and a reason a person can act on;
- an ``ok`` frame's ``image`` is float32 (H, W) in [0, 1] with bone bright (see
  :mod:`osteoscan.readers.pixels` for the DICOM pixel pipeline and its one VOI policy);
- one frame per image frame (multi-frame DICOM, multi-page TIFF), ``path`` as given.
"""

from __future__ import annotations

from pathlib import Path

from osteoscan.discover import sniff
from osteoscan.frames import ImageFrame, ReadLimits

__all__ = ["read_frames", "RASTER_KINDS"]

RASTER_KINDS: tuple[str, ...] = ("png", "jpeg", "tiff", "jpeg2000")


def read_frames(
    path: str | Path,
    kind: str | None = None,
    *,
    limits: ReadLimits | None = None,
    decode: bool = True,
) -> list[ImageFrame]:
    """All frames of one file; never raises for a bad file.

    ``kind`` (``dicom``, ``png``, ``jpeg``, ``tiff``, ``jpeg2000``, ``broken``, ``ignored``) skips
    sniffing when the caller already knows it (:func:`osteoscan.discover.discover` does).
    ``decode=False`` reads headers only: no pixels, and ``status == "ok"`` then means "readable
    header, decoder available". ``limits`` guards pixels, bytes and frames before decoding.
    """
    shown = str(path)
    p = Path(path)
    try:
        reason = ""
        if kind is None:
            kind, reason = sniff(p)
        if kind == "dicom":
            from osteoscan.readers.dicom import read_dicom

            return read_dicom(path, limits=limits, decode=decode)
        if kind in RASTER_KINDS:
            from osteoscan.readers.raster import read_raster

            return read_raster(path, kind, limits=limits, decode=decode)
        if kind == "ignored":
            return [
                ImageFrame(
                    path=shown, status="skipped", kind=kind, reason=reason or "not an image file"
                )
            ]
        return [
            ImageFrame(
                path=shown,
                status="error",
                kind=kind or "broken",
                reason=reason or f"unsupported file kind {kind!r}",
            )
        ]
    except BaseException as exc:  # noqa: BLE001 - the contract: one bad file never stops a batch
        # BaseException too: pyo3's PanicException (Rust decoders) does not derive from Exception.
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        return [
            ImageFrame(
                path=shown,
                status="error",
                kind=kind or "",
                reason=f"unexpected error while reading: {type(exc).__name__}: {str(exc)[:200]}",
            )
        ]
