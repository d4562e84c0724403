"""Content hashes shared by readers, training, model packages and the scan state."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20  # stream 1 MiB at a time: radiographs and weights can be hundreds of MB


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def content_image_id(path: str | Path) -> str:
    """``"sha256:"`` + the first 32 hex digits of the file's SHA-256: an image identity that
    carries no patient information (used where there is no SOPInstanceUID)."""
    return "sha256:" + file_sha256(path)[:32]
