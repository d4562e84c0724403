"""Model packages: a folder of ``manifest.json``, ``.safetensors`` members, card and report.

Layout::

    models/<name>/
        manifest.json                          # Manifest.to_dict(), written last, atomically
        member00-<arch>-<sha8>.safetensors     # one per ensemble member
        card.md                                # model card (optional)
        report/*.png|json                      # training report files (optional)

Integrity rules: :func:`load_package` checks every member file against the sha256 in the
manifest *before* reading it, and reads weights with safetensors only, so loading a model never
executes code (a pickle renamed ``.safetensors`` is refused even when its hash matches). Member
file names carry a hash prefix, so re-saving over an existing package never leaves a manifest that
points at half-written weights: the old manifest stays valid until the new one replaces it.

Reading manifests, finding packages and :func:`package_identity` need no torch and live in
:mod:`osteoscan.manifest` (re-exported here); this module imports torch only inside the
functions that save or load weights.

Weights are stored contiguous, float32 by default. ``save_package(..., dtype="float16")`` halves
the files; floating tensors are cast back to float32 on load, so such a package is no longer
bit-identical to the trained models (efficientnet_lite0 logits moved by up to 5e-2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from osteoscan import __version__
from osteoscan.atomic import AtomicFile, output_errors, write_bytes, write_text
from osteoscan.errors import ModelIntegrityError
from osteoscan.hashing import file_sha256

# The torch-free half (manifest classes, lookup, identity) lives in osteoscan.manifest and is
# re-exported here, so ``from osteoscan.package import read_manifest`` keeps working; torch is
# imported only by the functions that build or load models.
from osteoscan.manifest import (
    DEFAULT_MODEL,
    ENV_MODELS,
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    MemberSpec,
    ModelNotFoundError,
    list_packages,
    package_identity,
    read_manifest,
    resolve_package,
    search_dirs,
)
from osteoscan.rows import utc_now

Dtype = Literal["float32", "float16"]  # storage dtype of member weights

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "ENV_MODELS",
    "MANIFEST",
    "SCHEMA_VERSION",
    "Manifest",
    "MemberSpec",
    "ModelNotFoundError",
    "ModelPackage",
    "list_packages",
    "load_package",
    "package_identity",
    "read_manifest",
    "resolve_package",
    "save_package",
    "search_dirs",
    "verify_package",
]


@dataclass
class ModelPackage:
    """A loaded package: its folder, manifest and member models (eval mode, on the device)."""

    path: Path
    manifest: Manifest
    members: list[nn.Module]

    @property
    def identity(self) -> str:
        """:func:`package_identity` of the manifest."""
        return package_identity(self.manifest)


# --------------------------------------------------------------------------- weights


def _tensors_for_storage(model: nn.Module, dtype: Dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, val in model.state_dict().items():
        t = val.detach().to("cpu")
        if dtype == "float16" and t.is_floating_point():
            t = t.half()
        elif t.is_floating_point():
            t = t.float()
        # clone: safetensors refuses tensors sharing storage, and views are not contiguous
        out[key] = t.clone().contiguous()
    return out


def _write_member(out: Path, i: int, spec: MemberSpec, net: nn.Module, dtype: Dtype) -> MemberSpec:
    """Write member ``i``'s weights atomically; its spec with file name, sha256 and dtype."""
    from safetensors.torch import save_file

    tensors = _tensors_for_storage(net, dtype)
    # One metadata key only: safetensors writes a Rust HashMap, so several keys come out in
    # random order and identical weights would get different sha256s.
    meta = {"arch": spec.arch}
    # The file name carries the content's hash, so it is chosen after writing.
    f = AtomicFile(out / "member")
    try:
        with output_errors(out / f"member{i:02d}-{spec.arch}.safetensors"):
            save_file(tensors, str(f.tmp), metadata=meta)
        digest = file_sha256(f.tmp)
        fname = f"member{i:02d}-{spec.arch}-{digest[:8]}.safetensors"
        f.commit(fname)
    except BaseException:
        f.abort()
        raise
    return replace(spec, weights=fname, sha256=digest, dtype=dtype)


def save_package(
    out_dir: str | Path,
    manifest: Manifest,
    models: list[nn.Module],
    card: str | None = None,
    report: dict[str, bytes] | None = None,
    *,
    dtype: Dtype = "float32",
) -> Path:
    """Write a package to ``out_dir`` and return its path.

    One ``.safetensors`` per member (``models[i]`` ↔ ``manifest.members[i]``); ``weights``,
    ``sha256`` and ``dtype`` of each member, ``created_at`` and ``osteoscan_version`` are filled
    in. Every file is written to a temporary name and renamed; ``manifest.json`` comes last, so a
    crash leaves either the previous package or the complete new one. Stale member files of a
    previous save are removed afterwards. ``report`` maps file names under ``report/`` to bytes.
    """
    out = Path(out_dir)
    if len(models) != len(manifest.members):
        raise ValueError(f"{len(models)} models for {len(manifest.members)} member specs")
    out.mkdir(parents=True, exist_ok=True)
    members = [
        _write_member(out, i, spec, model, dtype)
        for i, (spec, model) in enumerate(zip(manifest.members, models, strict=True))
    ]
    manifest = replace(
        manifest,
        members=members,
        created_at=manifest.created_at or utc_now(),
        osteoscan_version=manifest.osteoscan_version or __version__,
    )
    manifest.validate()
    if card is not None:
        write_text(out / "card.md", card)
    for name, data in (report or {}).items():
        target = (out / "report" / name).resolve()
        if (out / "report").resolve() not in target.parents:
            raise ValueError(f"report file name escapes report/: {name!r}")
        write_bytes(target, data)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    write_text(out / MANIFEST, text)
    keep = {m.weights for m in members}
    for stale in out.glob("member*.safetensors"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return out


def verify_package(path: str | Path, manifest: Manifest | None = None) -> list[Path]:
    """Check every member file against its sha256; return the verified paths.

    Raises :class:`ModelIntegrityError` naming the first missing, misnamed or altered file.
    """
    path = Path(path)
    manifest = manifest or read_manifest(path)
    manifest.validate()
    files = []
    for m in manifest.members:
        if not m.weights or Path(m.weights).name != m.weights or m.weights.startswith("."):
            raise ModelIntegrityError(f"member weights name {m.weights!r} is not a plain file name")
        if not m.weights.endswith(".safetensors"):
            raise ModelIntegrityError(f"{m.weights}: only .safetensors weights are loaded")
        wpath = path / m.weights
        if not wpath.is_file():
            raise ModelIntegrityError(f"weights file {wpath} is missing")
        actual = file_sha256(wpath)
        if actual != m.sha256:
            raise ModelIntegrityError(
                f"weights file {wpath} does not match its sha256 in the manifest (expected "
                f"{m.sha256[:16]}…, found {actual[:16]}…): the package is corrupt or was "
                "modified; re-copy or retrain it"
            )
        files.append(wpath)
    return files


def load_package(ref: str | Path | None, device: str | torch.device = "cpu") -> ModelPackage:
    """Resolve, verify and load a package; members are in eval mode on ``device``.

    Each member's architecture is rebuilt from the registry with random init
    (``pretrained=False``) and its weights loaded strictly from safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from osteoscan.archs import create_model, set_plain_attr

    path = resolve_package(ref)
    manifest = read_manifest(path)
    files = verify_package(path, manifest)
    models = []
    for spec, wpath in zip(manifest.members, files, strict=True):
        try:
            tensors = load_file(str(wpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelIntegrityError(f"{wpath} is not a valid safetensors file: {exc}") from exc
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
        try:
            model = create_model(spec.arch, len(manifest.classes), pretrained=False)
            model.load_state_dict(tensors, strict=True)
        except (KeyError, RuntimeError) as exc:
            raise ModelIntegrityError(
                f"{wpath} does not fit architecture {spec.arch}: {exc}"
            ) from exc
        set_plain_attr(model, "pretrained_source", spec.pretrained or "package")
        models.append(model.to(device).eval())
    return ModelPackage(path=path, manifest=manifest, members=models)
