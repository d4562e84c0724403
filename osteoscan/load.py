"""The load stage: one file in, one :class:`LoadedFrame` per frame out — the same for every command.

``scan``, ``train``, ``evaluate`` and ``inspect`` all turn a file into model inputs here, so what is
trained on is exactly what is scanned: the same guarded read (per-file size, pixel and time limits:
:func:`osteoscan.guards.guarded_read`), the same frames (every frame of a multi-frame file), the
same body-part routing (:class:`osteoscan.scan.routing.Router`) and the same preprocessing
(:func:`osteoscan.preprocess.preprocess` with the configuration of the package that will score
the frame). A frame that will not be scored leaves as a status record (``skipped`` or ``error``
with a reason a person can act on); nothing here raises for a bad file.

Order for each frame::

    read (guarded) → status from the reader → gate (only projection radiographs) → route
    (body part → package) → preprocess

The gate (:mod:`osteoscan.gate`) skips CT, MR, ultrasound, colour and other images that are not
projection radiographs, whatever their body part; its :class:`~osteoscan.gate.GateCode` travels
on the record (``gate``) so later stages decide on it, never on the reason text. A DICOM whose
header was read but whose pixels were not (no decoder, truncated) is gated too: a CT slice is
``skipped`` as a CT slice, not an ``error`` asking for a decoder nobody needs.

The :class:`Loader` is picklable: DataLoader workers (or another engine's workers) call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteoscan.frames import ImageFrame, Status
from osteoscan.gate import GateCode, decide
from osteoscan.geometry import InputGeometry, display_copy
from osteoscan.preprocess import PreprocessConfig, preprocess_with_geometry
from osteoscan.scan.routing import Router

Reader = Callable[..., list[ImageFrame]]
# Technical header facts carried to the result (never identifiers); inspect shows them.
CARRIED_INFO = ("modality", "transfer_syntax", "photometric", "bits_stored", "rows", "columns")


@dataclass
class LoadedFrame:
    """One frame after the load stage: a model input for package ``package``, or a status record.

    ``pixels`` is the ``uint16`` (S, S) model input, set only when ``package`` is; ``image`` is
    the frame as read (float32 in [0, 1], bone bright), kept only when the loader was asked to
    (training fingerprints duplicates on it; scanning does not ship it between processes).
    ``gate`` is the gate's code (None when the gate did not look at the frame: a file that
    could not be read) and ``gate_reason`` its explanation, also for frames it let through.
    """

    path: str
    root: str
    frame: int
    kind: str
    status: Status
    reason: str
    image_id: str = ""
    body_part: str = "unknown"
    age: float | None = None
    sex: str | None = None
    package: int | None = None
    pixels: np.ndarray | None = None
    image: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # where the model input lies in the image, and a small uint8 copy of the image to draw a
    # heatmap on (only when the loader keeps them: scans that write heatmap PNGs)
    geometry: InputGeometry | None = None
    display: np.ndarray | None = None
    body_part_reason: str = ""
    gate: GateCode | None = None
    gate_reason: str = ""

    @property
    def scorable(self) -> bool:
        """True when this frame goes on to the score stage."""
        return self.package is not None and self.pixels is not None


def _guarded(path: str | Path, kind: str | None = None) -> list[ImageFrame]:
    from osteoscan.guards import guarded_read

    return guarded_read(path, kind)


@dataclass
class Loader:
    """Read, route and preprocess one file (see the module docstring).

    ``preprocess_cfgs[p]`` is the preprocessing of package ``p``; ``router`` picks ``p`` per frame.
    ``read`` replaces the default guarded reader (the scan engine passes one that also keeps an
    in-flight log for its watchdog). ``keep_image`` keeps the frame as read on ``ok`` records;
    ``keep_display`` keeps a small copy of it and the input geometry, for heatmap overlays.
    """

    router: Router
    preprocess_cfgs: Sequence[PreprocessConfig]
    read: Reader | None = None
    keep_image: bool = False
    keep_display: bool = False

    def __call__(
        self, path: str | Path, kind: str | None = None, root: str | Path = ""
    ) -> list[LoadedFrame]:
        """All frames of ``path`` (``kind`` from discovery when known; ``broken`` is an error)."""
        shown, base = str(path), str(root)
        if kind == "broken":
            from osteoscan.discover import sniff

            # Discovery's reason ("named .dcm but is not DICOM: starts with text"), not a shrug.
            why = sniff(path)[1] or "not a readable image file"
            return [_error(shown, base, kind, why)]
        try:
            frames = (self.read or _guarded)(path, kind)
        except Exception as exc:  # noqa: BLE001 - readers must not raise; if one does, it's a row
            return [_error(shown, base, kind or "", f"unreadable: {type(exc).__name__}: {exc}")]
        if not frames:
            return [_error(shown, base, kind or "", "the file holds no image frame")]
        return [self._frame(shown, base, kind or "", fr) for fr in frames]

    def _frame(self, path: str, root: str, kind: str, fr: ImageFrame) -> LoadedFrame:
        rec = LoadedFrame(
            path=path, root=root, frame=int(fr.frame), kind=fr.kind or kind, status=fr.status,
            reason=fr.reason, image_id=fr.image_id, body_part=fr.body_part, age=fr.age,
            sex=fr.sex, info={k: fr.info[k] for k in CARRIED_INFO if k in fr.info},
            body_part_reason=fr.body_part_reason,
        )  # fmt: skip
        if not self._gate(rec, fr):
            return rec
        image = fr.image
        assert image is not None  # _gate let through only frames with pixels
        route = self.router.route(fr)
        rec.body_part = route.body_part
        if route.package is None:
            rec.status, rec.reason = "skipped", route.reason
            return rec
        try:
            cfg = self.preprocess_cfgs[route.package]
            rec.pixels, geometry = preprocess_with_geometry(image, cfg)
        except Exception as exc:  # noqa: BLE001 - an odd image becomes an error row
            why = f"{type(exc).__name__}: {exc}"
            rec.status = "error"
            rec.reason = (
                "could not prepare this image for the model (an osteoscan bug on unusual "
                f"image content; please report it): {why}"
            )
            return rec
        rec.package = route.package
        if self.keep_image:
            rec.image = fr.image
        if self.keep_display:
            rec.geometry, rec.display = geometry, display_copy(image)
        return rec

    @staticmethod
    def _gate(rec: LoadedFrame, fr: ImageFrame) -> bool:
        """Apply the gate to ``rec``; True when the frame goes on to routing."""
        header_read = fr.kind == "dicom" and "sop_class_uid" in fr.info
        if fr.status == "ok" and fr.image is None:
            rec.status, rec.reason = "error", "the reader returned no pixels"
            return False
        if fr.status != "ok" and not (fr.status == "error" and header_read):
            return False
        decision = decide(fr)
        rec.gate, rec.gate_reason = decision.code, decision.reason
        if not decision.passed:
            rec.status, rec.reason = "skipped", decision.reason
        return rec.status == "ok"


def _error(path: str, root: str, kind: str, reason: str) -> LoadedFrame:
    return LoadedFrame(path=path, root=root, frame=0, kind=kind, status="error", reason=reason)


def single_model_loader(
    cfg: PreprocessConfig,
    body_parts: Sequence[str],
    *,
    body_part: str | None = None,
    keep_image: bool = False,
) -> Loader:
    """A :class:`Loader` for one model (training, evaluation, inspection) serving ``body_parts``.

    ``body_part`` is the ``--body-part`` value for files that state none (``None``/``auto``: the
    single part served), exactly as in a scan with that one package.
    """
    router = Router([list(body_parts)], ["the model"], body_part)
    return Loader(router, [cfg], keep_image=keep_image)
