"""Model packages: a folder of ``manifest.json``, ``.safetensors`` members, card and report.

Layout::

    models/<name>/
        manifest.json                            # Manifest.to_dict(), written last, atomically
        member00-<arch>-<sha8>.safetensors       # one per ensemble member stored whole, or
        member00-<arch>-head-<sha8>.safetensors  # its head only, when its trunk is shared:
        trunk-<arch>-<sha8>.safetensors          # every tensor outside the head, stored once
        card.md                                  # model card (optional)
        report/*.png|json                        # training report files (optional)

Shared trunks: members whose tensors outside the head (``ArchSpec.head``) are identical - probe
heads on one frozen backbone - are saved as one ``trunk-*`` file plus a small head file each
(``MemberSpec.trunk``/``trunk_sha256``, manifest schema 3); members with a trunk of their own
are saved whole, as before. Both forms load, and so do packages saved before shared trunks.

Integrity rules: :func:`load_package` checks every member and trunk file against the sha256 in
the manifest *before* reading it, and reads weights with safetensors only, so loading a model never
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


def _write_tensors(out: Path, stem: str, arch: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` atomically as ``<stem>-<sha8>.safetensors``; returns the full sha256."""
    from safetensors.torch import save_file

    # One metadata key only: safetensors writes a Rust HashMap, so several keys come out in
    # random order and identical weights would get different sha256s.
    meta = {"arch": arch}
    # The file name carries the content's hash, so it is chosen after writing.
    f = AtomicFile(out / stem.split("-")[0])
    try:
        with output_errors(out / f"{stem}.safetensors"):
            save_file(tensors, str(f.tmp), metadata=meta)
        digest = file_sha256(f.tmp)
        f.commit(f"{stem}-{digest[:8]}.safetensors")
    except BaseException:
        f.abort()
        raise
    return digest


def _write_members(
    out: Path, specs: list[MemberSpec], models: list[nn.Module], dtype: Dtype, share: bool
) -> list[MemberSpec]:
    """Write every member's weights; their specs with file names, sha256s, dtype and trunk.

    Members whose trunk tensors are equal (by digest of the stored tensors) share one trunk
    file when ``share``; the others are stored whole.
    """
    from osteoscan.trunks import split_state, tensors_digest

    stored = [_tensors_for_storage(m, dtype) for m in models]
    parts = [split_state(t, s.arch) for t, s in zip(stored, specs, strict=True)]
    keys = [(s.arch, tensors_digest(trunk)) for s, (trunk, _) in zip(specs, parts, strict=True)]
    trunk_files: dict[tuple[str, str], tuple[str, str]] = {}
    out_specs = []
    for i, (spec, tensors, (trunk, head), key) in enumerate(
        zip(specs, stored, parts, keys, strict=True)
    ):
        spec = replace(spec, dtype=dtype, trunk="", trunk_sha256="")
        if not share or keys.count(key) < 2:
            digest = _write_tensors(out, f"member{i:02d}-{spec.arch}", spec.arch, tensors)
            out_specs.append(replace(spec, weights=_name(i, spec.arch, digest), sha256=digest))
            continue
        if key not in trunk_files:
            tdigest = _write_tensors(out, f"trunk-{spec.arch}", spec.arch, trunk)
            trunk_files[key] = (f"trunk-{spec.arch}-{tdigest[:8]}.safetensors", tdigest)
        digest = _write_tensors(out, f"member{i:02d}-{spec.arch}-head", spec.arch, head)
        tname, tdigest = trunk_files[key]
        name = _name(i, spec.arch + "-head", digest)
        out_specs.append(
            replace(spec, weights=name, sha256=digest, trunk=tname, trunk_sha256=tdigest)
        )
    return out_specs


def _name(i: int, kind: str, digest: str) -> str:
    return f"member{i:02d}-{kind}-{digest[:8]}.safetensors"


def save_package(
    out_dir: str | Path,
    manifest: Manifest,
    models: list[nn.Module],
    card: str | None = None,
    report: dict[str, bytes] | None = None,
    *,
    dtype: Dtype = "float32",
    share_trunks: bool = True,
) -> Path:
    """Write a package to ``out_dir`` and return its path.

    One ``.safetensors`` per member (``models[i]`` ↔ ``manifest.members[i]``), plus one
    ``trunk-*.safetensors`` per trunk that several members share (``share_trunks=False`` stores
    every member whole). Each member's ``weights``,
    ``sha256``, ``trunk``, ``trunk_sha256`` and ``dtype``, ``created_at`` and
    ``osteoscan_version`` are filled in. Every file is written to a temporary name and renamed;
    ``manifest.json`` comes last, so a crash leaves either the previous package or the complete
    new one. Stale member and trunk files of a previous save are removed afterwards. ``report``
    maps file names under ``report/`` to bytes.
    """
    out = Path(out_dir)
    if len(models) != len(manifest.members):
        raise ValueError(f"{len(models)} models for {len(manifest.members)} member specs")
    out.mkdir(parents=True, exist_ok=True)
    members = _write_members(out, list(manifest.members), models, dtype, share_trunks)
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
    keep = {m.weights for m in members} | {m.trunk for m in members}
    for stale in [*out.glob("member*.safetensors"), *out.glob("trunk*.safetensors")]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return out


def _verified(path: Path, name: str, sha256: str) -> Path:
    """``path / name`` after checking the name is a plain ``.safetensors`` file of that sha256."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ModelIntegrityError(f"member weights name {name!r} is not a plain file name")
    if not name.endswith(".safetensors"):
        raise ModelIntegrityError(f"{name}: only .safetensors weights are loaded")
    wpath = path / name
    if not wpath.is_file():
        raise ModelIntegrityError(f"weights file {wpath} is missing")
    actual = file_sha256(wpath)
    if actual != sha256:
        raise ModelIntegrityError(
            f"weights file {wpath} does not match its sha256 in the manifest (expected "
            f"{sha256[:16]}…, found {actual[:16]}…): the package is corrupt or was "
            "modified; re-copy or retrain it"
        )
    return wpath


def verify_package(path: str | Path, manifest: Manifest | None = None) -> list[Path]:
    """Check every member file and every shared trunk file against its sha256; return the
    verified paths (members' files in order, then each trunk file once).

    Raises :class:`ModelIntegrityError` naming the first missing, misnamed or altered file.
    """
    path = Path(path)
    manifest = manifest or read_manifest(path)
    manifest.validate()
    files = [_verified(path, m.weights, m.sha256) for m in manifest.members]
    trunks = {m.trunk: m.trunk_sha256 for m in manifest.members if m.trunk}
    if len(trunks) != len({(m.trunk, m.trunk_sha256) for m in manifest.members if m.trunk}):
        raise ModelIntegrityError("one trunk file is listed with different sha256s")
    return files + [_verified(path, name, sha) for name, sha in trunks.items()]


def _read_tensors(wpath: Path) -> dict[str, torch.Tensor]:
    """A verified file's tensors (safetensors only: never unpickles), floats as float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelIntegrityError(f"{wpath} is not a valid safetensors file: {exc}") from exc
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


def load_package(ref: str | Path | None, device: str | torch.device = "cpu") -> ModelPackage:
    """Resolve, verify and load a package; members are in eval mode on ``device``.

    Each member's architecture is rebuilt from the registry with random init
    (``pretrained=False``) and its weights - its own file, plus its shared trunk file if it has
    one, each file read once - loaded strictly from safetensors.
    """
    from osteoscan.archs import create_model, set_plain_attr

    path = resolve_package(ref)
    manifest = read_manifest(path)
    verify_package(path, manifest)  # every file, before any is read
    trunks: dict[str, dict[str, torch.Tensor]] = {}
    models = []
    for spec in manifest.members:
        wpath = path / spec.weights
        tensors = _read_tensors(wpath)
        if spec.trunk:
            if spec.trunk not in trunks:
                trunks[spec.trunk] = _read_tensors(path / spec.trunk)
            both = set(tensors) & set(trunks[spec.trunk])
            if both:
                raise ModelIntegrityError(f"{wpath} and {spec.trunk} both hold {min(both)}")
            tensors = {**trunks[spec.trunk], **tensors}
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
