"""Numbers several modules share, defined once (torch-free, so manifests can use them)."""

from __future__ import annotations

# Model inputs are single-channel uint16 arrays: [0, 1] images scaled to [0, U16_MAX].
U16_MAX = 65535.0
# ImageNet normalisation: the default mean / std of pretrained backbones (per RGB channel).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
