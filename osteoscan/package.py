"""Model packages: a folder of ``manifest.json``, ``.safetensors`` members, card and report.

Layout (DESIGN.md "Model package")::

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

Weights are stored contiguous, float32 by default. ``save_package(..., dtype="float16")`` halves
the files; floating tensors are cast back to float32 on load, so such a package is no longer
bit-identical to the trained models (efficientnet_lite0 logits moved by up to 5e-2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from osteoscan import __version__
from osteoscan.archs import create_model, get_arch
from osteoscan.errors import ModelIntegrityError, OsteoscanError
from osteoscan.hashing import file_sha256
from osteoscan.preprocess import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MODEL = "knee-default"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENV_MODELS = "OSTEOSCAN_MODELS"


class ModelNotFoundError(OsteoscanError):
    """No model package by that name or path (exit code 1)."""


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: architecture, weights file (+ sha256) and how to feed it.

    ``weights`` and ``sha256`` are filled in by :func:`save_package`. ``dtype`` is the storage
    dtype of the weights file. ``fold`` is the cross-validation fold that produced the member.
    """

    arch: str
    weights: str = ""
    sha256: str = ""
    input_size: int = 224
    temperature: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fold: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    pretrained: str = ""
    dtype: Literal["float32", "float16"] = "float32"

    @classmethod
    def for_arch(cls, arch: str, input_size: int | None = None, **kwargs: Any) -> MemberSpec:
        """A spec whose size and normalisation come from the registry's :class:`ArchSpec`."""
        spec = get_arch(arch)
        size = input_size or spec.default_size
        return cls(arch=arch, input_size=size, mean=spec.mean, std=spec.std, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemberSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        d = _known(cls, data, "member")
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to run a package and to know how it was made (``manifest.json``).

    Free-form extras that fit no field go into ``extra`` (unknown top-level keys are refused so
    a typo can never be silently ignored).
    """

    name: str
    version: str
    classes: list[str]
    positive_classes: list[str] = field(default_factory=list)
    threshold: float = 0.5
    target_sensitivity: float | None = None
    body_parts: list[str] = field(default_factory=lambda: ["knee"])
    preprocess: dict[str, Any] = field(default_factory=dict)
    covariates: list[str] = field(default_factory=list)
    members: list[MemberSpec] = field(default_factory=list)
    fusion: dict[str, Any] | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    osteoscan_version: str = ""
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as written to ``manifest.json``."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["members"] = [m.to_dict() for m in self.members]
        return json.loads(json.dumps(d))  # deep copy; fails early on non-JSON values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict`; refuses newer schema versions and unknown keys."""
        version = int(data.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise ModelIntegrityError(
                f"manifest schema version {version} is newer than this osteoscan supports "
                f"({SCHEMA_VERSION}); upgrade osteoscan"
            )
        d = _known(cls, data, "manifest")
        d["members"] = [MemberSpec.from_dict(m) for m in d.get("members", [])]
        return cls(**d)

    def validate(self) -> None:
        """Raise :class:`ModelIntegrityError` when the manifest is inconsistent."""
        problems = []
        if not self.name or not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            problems.append(f"name {self.name!r} must be non-empty [A-Za-z0-9._-]")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            problems.append(f"classes must be >= 2 distinct names, got {self.classes}")
        if not self.positive_classes or not set(self.positive_classes) <= set(self.classes):
            problems.append(f"positive_classes {self.positive_classes} not a subset of classes")
        if not self.version:
            problems.append("version must be non-empty")
        if not self.body_parts or not set(self.body_parts) <= {"knee", "spine"}:
            problems.append(
                f"body_parts {self.body_parts} must be a non-empty subset of knee, spine"
            )
        if not 0.0 <= float(self.threshold) <= 1.0:
            problems.append(f"threshold {self.threshold} outside [0, 1]")
        if not self.members:
            problems.append("no members")
        for m in self.members:
            if m.temperature <= 0:
                problems.append(f"member {m.arch}: temperature must be > 0")
        if problems:
            raise ModelIntegrityError("invalid manifest: " + "; ".join(problems))


def _known(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ModelIntegrityError(f"{what} must be a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ModelIntegrityError(f"unknown {what} key(s): {', '.join(sorted(unknown))}")
    return dict(data)


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


# --------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    return file_sha256(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems / platforms cannot open directories
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` then fsync + rename, so readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; packages are shared, readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tensors_for_storage(model: nn.Module, dtype: str) -> dict[str, torch.Tensor]:
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


def save_package(
    out_dir: str | Path,
    manifest: Manifest,
    models: list[nn.Module],
    card: str | None = None,
    report: dict[str, bytes] | None = None,
    *,
    dtype: Literal["float32", "float16"] = "float32",
) -> Path:
    """Write a package to ``out_dir`` and return its path.

    One ``.safetensors`` per member (``models[i]`` ↔ ``manifest.members[i]``); ``weights``,
    ``sha256`` and ``dtype`` of each member, ``created_at`` and ``osteoscan_version`` are filled
    in. Every file is written to a temporary name and renamed; ``manifest.json`` comes last, so a
    crash leaves either the previous package or the complete new one. Stale member files of a
    previous save are removed afterwards. ``report`` maps file names under ``report/`` to bytes.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if len(models) != len(manifest.members):
        raise ValueError(f"{len(models)} models for {len(manifest.members)} member specs")
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (spec, model) in enumerate(zip(manifest.members, models, strict=True)):
        tensors = _tensors_for_storage(model, dtype)
        # One metadata key only: safetensors writes a Rust HashMap, so several keys come out in
        # random order and identical weights would get different sha256s.
        meta = {"arch": spec.arch}
        fd, tmp = tempfile.mkstemp(prefix=".member.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(Path(tmp))
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; packages are shared, readable files
            fname = f"member{i:02d}-{spec.arch}-{digest[:8]}.safetensors"
            os.replace(tmp, out / fname)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        members.append(replace(spec, weights=fname, sha256=digest, dtype=dtype))
    manifest = replace(
        manifest,
        members=members,
        created_at=manifest.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        osteoscan_version=manifest.osteoscan_version or __version__,
    )
    manifest.validate()
    if card is not None:
        _atomic_write(out / "card.md", lambda p: p.write_text(card, encoding="utf-8"))
    for name, data in (report or {}).items():
        target = (out / "report" / name).resolve()
        if (out / "report").resolve() not in target.parents:
            raise ValueError(f"report file name escapes report/: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, lambda p, data=data: p.write_bytes(data))
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    _atomic_write(out / MANIFEST, lambda p: p.write_text(text, encoding="utf-8"))
    _fsync_dir(out)
    keep = {m.weights for m in members}
    for stale in out.glob("member*.safetensors"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return out


def read_manifest(path: str | Path) -> Manifest:
    """The :class:`Manifest` of a package folder (or of a ``manifest.json`` path)."""
    path = Path(path)
    mpath = path if path.name == MANIFEST else path / MANIFEST
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelIntegrityError(f"{mpath} is missing: not a model package") from None
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(f"{mpath} is unreadable or not valid JSON: {exc}") from exc
    try:
        return Manifest.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ModelIntegrityError(f"{mpath}: {exc}") from exc


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
        actual = sha256_file(wpath)
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
        model.pretrained_source = spec.pretrained or "package"
        models.append(model.to(device).eval())
    return ModelPackage(path=path, manifest=manifest, members=models)


# --------------------------------------------------------------------------- lookup


def search_dirs() -> list[Path]:
    """Where package names are looked up: ``$OSTEOSCAN_MODELS`` (``os.pathsep``-separated),
    ``./models``, then the ``models/`` folder next to the installed source tree."""
    dirs = [Path(p) for p in os.environ.get(ENV_MODELS, "").split(os.pathsep) if p]
    import osteoscan

    dirs += [Path.cwd() / "models", Path(osteoscan.__file__).resolve().parents[1] / "models"]
    seen, out = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def resolve_package(ref: str | Path | None) -> Path:
    """Folder of the package ``ref``: a path to a package folder (or its ``manifest.json``), or a
    name searched in :func:`search_dirs`; ``None`` means :data:`DEFAULT_MODEL`."""
    ref = DEFAULT_MODEL if ref is None else ref
    as_path = Path(ref)
    if isinstance(ref, Path) or os.sep in str(ref) or as_path.exists():
        if as_path.name == MANIFEST:
            as_path = as_path.parent
        if (as_path / MANIFEST).is_file():
            return as_path.absolute()
        raise ModelNotFoundError(f"{as_path} is not a model package (no {MANIFEST})")
    dirs = search_dirs()
    for d in dirs:
        if (d / str(ref) / MANIFEST).is_file():
            return d / str(ref)
    for path, manifest in list_packages():
        if manifest.name == ref:
            return path
    shown = ", ".join(str(d) for d in dirs)
    hint = " (train one with `osteoscan train`)" if ref == DEFAULT_MODEL else ""
    raise ModelNotFoundError(
        f"model {ref!r} not found{hint}; searched {shown}. Pass --model DIR or set {ENV_MODELS}"
    )


def list_packages() -> list[tuple[Path, Manifest]]:
    """Every readable package in :func:`search_dirs` (an earlier folder shadows a later one
    holding a package with the same folder name); unreadable manifests are skipped."""
    found: list[tuple[Path, Manifest]] = []
    names: set[str] = set()
    for d in search_dirs():
        if not d.is_dir():
            continue
        for sub in sorted(p for p in d.iterdir() if (p / MANIFEST).is_file()):
            if sub.name in names:
                continue
            try:
                manifest = read_manifest(sub)
            except ModelIntegrityError:
                continue
            names.add(sub.name)
            found.append((sub, manifest))
    return found


def package_identity(manifest: Manifest) -> str:
    """Stable 32-hex identity of everything in a package that changes output rows.

    Covers name, version, classes, positive classes, threshold, preprocessing, covariates,
    fusion and per member arch/sha256/size/normalisation/temperature; not timestamps or metrics,
    so re-saving identical weights keeps the identity. Incremental scan state is keyed by it.
    """
    key = {
        "name": manifest.name,
        "version": manifest.version,
        "classes": list(manifest.classes),
        "positive_classes": list(manifest.positive_classes),
        "threshold": float(manifest.threshold),
        "preprocess": manifest.preprocess,
        "covariates": list(manifest.covariates),
        "fusion": manifest.fusion,
        "members": [
            [m.arch, m.sha256, m.input_size, list(m.mean), list(m.std), float(m.temperature)]
            for m in manifest.members
        ],
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
