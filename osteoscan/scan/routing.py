"""Which model package scores which image frame, decided by body part.

Rules:

- Each package declares the body parts it serves (``manifest.body_parts``). A frame is scored by
  the first package given (``--model`` order) that serves its body part.
- The body part comes from the file when the file says one: a DICOM header naming the knee or the
  spine (``BodyPartExamined`` or a description, see :mod:`osteoscan.header`) is final, and so is a
  header naming *another* part (``CHEST``): ``--body-part`` never overrides a header.
- ``--body-part knee|spine`` applies only to frames whose file carries no body part: PNG, JPEG,
  TIFF, and DICOMs without any usable body-part information.
- ``--body-part auto`` (the default) gives such frames the body part the loaded packages serve
  when they serve exactly one (the default knee model → knee; the ``body_part`` column shows it):
  pointing a knee model at a folder of knee JPEGs must score them, not skip them all. With
  packages for several parts it cannot choose, so those frames are skipped with a hint.
- No serving package → ``skipped`` with a reason a person can act on.

The :class:`Router` is small and picklable: DataLoader workers use it to pick the preprocessing
of the package that will score each frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from osteoscan.frames import ImageFrame

ROUTABLE_PARTS = ("knee", "spine")


@dataclass(frozen=True)
class Route:
    """Decision for one frame: ``package`` index (or None → skipped) and the body part used."""

    package: int | None
    body_part: str
    reason: str = ""  # why skipped; empty when routed


def file_body_part(frame: ImageFrame) -> str | None:
    """The body part the *file* states (``knee``/``spine``/``unknown`` for another part), or None.

    None means the file says nothing usable, so ``--body-part`` may apply.
    """
    if frame.body_part in ROUTABLE_PARTS:
        return frame.body_part
    return "unknown" if frame.body_part_stated else None


@dataclass
class Router:
    """Route frames to packages. ``served[i]`` are the body parts package ``i`` serves.

    ``names[i]`` labels package ``i`` in reasons (e.g. ``"knee-default 1.0"``). ``override`` is
    the ``--body-part`` value (``None``/``"auto"`` → the single served part, if there is one).
    """

    served: Sequence[Sequence[str]]
    names: Sequence[str] = ()
    override: str | None = None
    _table: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _assumed: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.override in (None, "", "auto"):
            self.override = None
        elif self.override not in ROUTABLE_PARTS:
            raise ValueError(f"--body-part must be auto, knee or spine, not {self.override!r}")
        for i, parts in enumerate(self.served):
            for part in parts:
                # First package given wins when two serve the same part (documented behaviour).
                self._table.setdefault(str(part).lower(), i)
        routable = {p for p in self._table if p in ROUTABLE_PARTS}
        if self.override is None and len(routable) == 1:
            self._assumed = routable.pop()

    def _served_text(self) -> str:
        if not self.served:
            return "no model packages loaded"
        items = []
        for i, parts in enumerate(self.served):
            name = self.names[i] if i < len(self.names) else f"package {i}"
            items.append(f"{name} serves {', '.join(parts) or 'nothing'}")
        return "; ".join(items)

    def route(self, frame: ImageFrame) -> Route:
        """Pick the package for ``frame`` (an ``ok`` frame), or say why none applies."""
        stated = file_body_part(frame)
        if stated is None and self.override is not None:
            part, source = self.override, "--body-part"
        elif stated is None and self._assumed is not None:
            part, source = self._assumed, "assumed"
        else:
            part, source = stated or "unknown", frame.body_part_reason or ""
        if part in self._table:
            return Route(self._table[part], part)
        if part == "unknown":
            detail = f" ({source})" if source else ""
            hint = (
                ""
                if stated == "unknown"
                else "; if these are knee or spine images, say so with --body-part knee|spine"
            )
            return Route(
                None,
                part,
                f"body part unknown{detail}: no model installed for body part unknown{hint}",
            )
        return Route(
            None,
            part,
            f"{part} image but no {part} model installed ({self._served_text()}); "
            f"add a {part} package with --model",
        )
