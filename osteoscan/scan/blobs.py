"""How the state stores arrays and row values: raw or zlib-compressed bytes plus a JSON shape."""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np


def encode_array(
    arr: np.ndarray | None, dtype: str, compress: bool
) -> tuple[bytes | None, str | None]:
    """``arr`` as (bytes, JSON shape), ``dtype`` on disk; ``(None, None)`` for no array."""
    if arr is None:
        return None, None
    a = np.ascontiguousarray(np.asarray(arr, dtype=dtype))
    raw = a.tobytes()
    return (zlib.compress(raw, 3) if compress else raw), json.dumps(list(a.shape))


def decode_array(blob: bytes | None, shape: str | None, dtype: str, compressed: bool) -> Any:
    """Inverse of :func:`encode_array` (``None`` stays ``None``)."""
    if blob is None or shape is None:
        return None
    raw = zlib.decompress(blob) if compressed else blob
    return np.frombuffer(raw, dtype=dtype).reshape(json.loads(shape))


def json_default(obj: Any) -> Any:
    """numpy scalars and paths inside row dicts become plain JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
