"""Fingerprints of a model's training images, so ``evaluate`` can say when it is given them.

A package records them in its manifest (``training_fingerprints``)::

    {"format": 1, "digits": 16, "sha256": [...], "pixels": [...]}

- ``sha256``: the start of the sha256 of each training file's bytes (exact copies);
- ``pixels``: the start of each training frame's pixel hash
  (:func:`osteoscan.train.dedup.pixel_hash`: the decoded image quantised to 16 bits), which also
  catches a PNG re-save of a JPEG's pixels or a DICOM re-encoded with another transfer syntax.

Both are cut to ``digits`` hex digits (64 bits): a chance match between different images is about
``n * m / 2**64``, nothing in practice, and a 200-image set costs ~7 KB of manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FORMAT = 1
DIGITS = 16


def fingerprint_record(file_hashes: Iterable[str], pixel_hashes: Iterable[str]) -> dict[str, Any]:
    """The manifest's ``training_fingerprints`` for these full-length hex digests."""
    return {
        "format": FORMAT,
        "digits": DIGITS,
        "sha256": sorted({h[:DIGITS] for h in file_hashes if h}),
        "pixels": sorted({h[:DIGITS] for h in pixel_hashes if h}),
    }


@dataclass(frozen=True)
class TrainingFingerprints:
    """The training set of a package, as fingerprints; :meth:`match` looks one image up."""

    files: frozenset[str]
    pixels: frozenset[str]
    digits: int = DIGITS

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> TrainingFingerprints | None:
        """From a manifest's record; ``None`` when the package has none (older packages)."""
        if not record or int(record.get("format", 0)) != FORMAT:
            return None
        return cls(
            frozenset(record.get("sha256", ())),
            frozenset(record.get("pixels", ())),
            int(record.get("digits", DIGITS)),
        )

    def __len__(self) -> int:
        return len(self.pixels)

    def match(self, file_sha256: str, pixel_hash: str | None = None) -> str | None:
        """``"file"`` (same bytes), ``"pixels"`` (same decoded image) or ``None`` (not seen)."""
        if file_sha256 and file_sha256[: self.digits] in self.files:
            return "file"
        if pixel_hash and pixel_hash[: self.digits] in self.pixels:
            return "pixels"
        return None
