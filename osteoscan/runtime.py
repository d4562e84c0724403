"""Device selection and CPU runtime settings (threads, allocator)."""

from __future__ import annotations

import torch

from osteoscan.errors import UsageError


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` → first CUDA device when available, else CPU; ``cpu``; ``cuda``/``cuda:N``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available on this machine")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return dev
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")
