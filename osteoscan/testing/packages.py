"""Small, real model packages for tests and benchmarks (no training, no download)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def tiny_package(
    out: str | Path,
    *,
    name: str = "tiny-knee",
    body_parts: Sequence[str] = ("knee",),
    members: int = 2,
    size: int = 64,
    classes: Sequence[str] = ("normal", "osteopenia", "osteoporosis"),
    threshold: float = 0.5,
    seed: int = 0,
) -> Path:
    """Save a package of seeded ``tiny_cnn`` members at ``out``; returns its folder.

    A genuine package (safetensors + sha256 manifest) that scores fast: it exercises every stage
    of a scan without a real model's cost. Positive classes: all but the first.
    """
    import torch

    from osteoscan.archs import create_model
    from osteoscan.package import Manifest, MemberSpec, save_package

    torch.manual_seed(seed)
    models = [create_model("tiny_cnn", len(classes)) for _ in range(members)]
    manifest = Manifest(
        name=name,
        version="0.0.1",
        classes=list(classes),
        positive_classes=list(classes[1:]),
        threshold=threshold,
        body_parts=list(body_parts),
        preprocess={"size": size},
        members=[
            MemberSpec.for_arch("tiny_cnn", input_size=size, temperature=1.0 + 0.5 * i)
            for i in range(members)
        ],
    )
    return Path(save_package(Path(out), manifest, models))
