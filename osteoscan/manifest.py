"""Model package manifests without torch: read, resolve, identify (``manifest.json``).

Everything here is plain JSON and file-system work, so a caller that only needs to know *which*
package it would run - the no-op fast path of a nightly ``osteoscan scan`` (the run key is
:func:`package_identity`), ``osteoscan models``, ``--help`` - never imports torch.
:mod:`osteoscan.package` re-exports all public names and adds saving, verifying and loading.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from osteoscan.constants import IMAGENET_MEAN, IMAGENET_STD
from osteoscan.errors import ModelIntegrityError, OsteoscanError

DEFAULT_MODEL = "knee-default"
# 2: per-variant thresholds are top-level fields (schema 1 kept them in ``fusion``, still read).
# 3: members may share a trunk file (MemberSpec.trunk, trunk_sha256); schema 2 is read as is.
# 4: members may average their logits over the image and its mirror (MemberSpec.test_time_flip).
# A package is written with the oldest schema that holds it (Manifest.to_dict), so packages
# without flipping members stay readable by the osteoscan versions that know schema 3.
SCHEMA_VERSION = 4
_LEGACY_THRESHOLDS = "thresholds"  # schema 1's key inside the fusion dict
MANIFEST = "manifest.json"
ENV_MODELS = "OSTEOSCAN_MODELS"
# The repository's top-level models/ folder, installed as this package (setup.py maps it), so a
# wheel carries the default model and a source checkout keeps it where people look for it.
BUNDLED_MODELS = "osteoscan._models"


class ModelNotFoundError(OsteoscanError):
    """No model package by that name or path (exit code 1)."""


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: architecture, weights file (+ sha256) and how to feed it.

    ``weights`` and ``sha256`` are filled in by :func:`save_package`. ``dtype`` is the storage
    dtype of the weights file. ``fold`` is the cross-validation fold that produced the member.
    ``trunk``/``trunk_sha256``: a ``trunk-*.safetensors`` file holding every tensor outside the
    head, shared with other members; ``weights`` then holds the head's tensors only. Empty for a
    member stored whole. ``test_time_flip``: the member's logits are the mean of its logits for
    the image and for its mirror image (horizontal flip), at training-time validation as at scan
    time, so calibration, thresholds and grade cut-offs were fitted on what a scan computes.
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
    trunk: str = ""
    trunk_sha256: str = ""
    test_time_flip: bool = False

    @classmethod
    def for_arch(cls, arch: str, input_size: int | None = None, **kwargs: Any) -> MemberSpec:
        """A spec whose size and normalisation come from the registry's :class:`ArchSpec`."""
        from osteoscan.archs import get_arch  # torch: only when building a new spec

        spec = get_arch(arch)
        size = input_size or spec.default_size
        return cls(arch=arch, input_size=size, mean=spec.mean, std=spec.std, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if not self.test_time_flip:
            del d["test_time_flip"]  # schema 3 has no such key: keep such packages schema 3
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
    # Screening thresholds on the positive-class score (see threshold_for): image-only and fused
    # scores live on different scales, so a package with covariate fusion has one for each.
    threshold: float = 0.5
    image_only_threshold: float | None = None
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
    # Fingerprints of the training images (osteoscan.train.fingerprints): evaluate warns on them.
    training_fingerprints: dict[str, Any] | None = None
    # What the members predict beyond plain classes: None (classes), {"kind": "ordinal"} (ordered
    # classes) or {"kind": "tscore", "cutoffs": [-1, -2.5], "scale": [tau per member], ...}: a
    # T-score model whose predicted T-score osteoscan.train.tscore recovers from the probabilities.
    target: dict[str, Any] | None = None
    # The schema it was read as (to_dict writes the oldest that holds it): not part of equality,
    # so a manifest equals itself read back.
    schema_version: int = field(default=SCHEMA_VERSION, compare=False)

    def __post_init__(self) -> None:
        # Schema 1 kept the per-variant thresholds inside the fusion dict, as
        # ``fusion["thresholds"] = {"image_only": t, "combined": t}``; they become fields here, the
        # one place that knows those keys. (The frozen dataclass is still being built.)
        legacy = (self.fusion or {}).get(_LEGACY_THRESHOLDS)
        if self.fusion is None or legacy is None:
            return
        fusion = {k: v for k, v in self.fusion.items() if k != _LEGACY_THRESHOLDS}
        object.__setattr__(self, "fusion", fusion)
        if "combined" in legacy:
            object.__setattr__(self, "threshold", float(legacy["combined"]))
        if "image_only" in legacy:
            object.__setattr__(self, "image_only_threshold", float(legacy["image_only"]))

    def threshold_for(self, fused: bool) -> float:
        """The threshold for a row scored with covariates (``fused``) or on the image alone."""
        if not fused and self.image_only_threshold is not None:
            return float(self.image_only_threshold)
        return float(self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as written to ``manifest.json``: the current schema, numbered as the
        oldest one that holds it (3 unless a member flips at test time)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["schema_version"] = 4 if any(m.test_time_flip for m in self.members) else 3
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
        for name in ("threshold", "image_only_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                problems.append(f"{name} {value} outside [0, 1]")
        if not self.members:
            problems.append("no members")
        for m in self.members:
            if m.temperature <= 0:
                problems.append(f"member {m.arch}: temperature must be > 0")
            if bool(m.trunk) != bool(m.trunk_sha256):
                problems.append(f"member {m.weights}: trunk and trunk_sha256 go together")
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


# --------------------------------------------------------------------------- lookup


def bundled_models_dir() -> Path | None:
    """The folder of the packages that ship with osteoscan (:data:`BUNDLED_MODELS`), or ``None``.

    ``None`` when that package is not importable as plain files, e.g. an editable install made
    before it existed (re-run ``pip install -e .``).
    """
    try:
        root = importlib.resources.files(BUNDLED_MODELS)
    except ModuleNotFoundError:
        return None
    return root if isinstance(root, Path) else None


def search_dirs() -> list[Path]:
    """Where package names are looked up: ``$OSTEOSCAN_MODELS`` (``os.pathsep``-separated),
    ``./models``, then the packages installed with osteoscan (:func:`bundled_models_dir`)."""
    dirs = [Path(p) for p in os.environ.get(ENV_MODELS, "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "models")
    bundled = bundled_models_dir()
    if bundled is not None:
        dirs.append(bundled)
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
    fusion and per member arch/sha256/size/normalisation/temperature (and the trunk's sha256 for
    a member with a shared trunk, and whether it flips at test time); not timestamps or metrics,
    so re-saving identical weights the same way keeps the identity. Incremental scan state is
    keyed by it.
    """
    key = {
        "name": manifest.name,
        "version": manifest.version,
        "classes": list(manifest.classes),
        "positive_classes": list(manifest.positive_classes),
        "threshold": float(manifest.threshold),
        "preprocess": manifest.preprocess,
        "covariates": list(manifest.covariates),
        "fusion": _fusion_as_in_schema_1(manifest),
        "members": [_member_identity(m) for m in manifest.members],
    }
    if manifest.target:  # only when set: older packages keep their identity
        key["target"] = manifest.target
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _member_identity(m: MemberSpec) -> list[Any]:
    # A whole member's entry is as before shared trunks existed: its identity is unchanged.
    key = [m.arch, m.sha256, m.input_size, list(m.mean), list(m.std), float(m.temperature)]
    key = [*key, m.trunk_sha256] if m.trunk else key
    return [*key, "test_time_flip"] if m.test_time_flip else key  # only then: older ids stay


def _fusion_as_in_schema_1(manifest: Manifest) -> dict[str, Any] | None:
    """The fusion dict with the image-only threshold put back where schema 1 kept it, so that a
    package keeps its identity (and a nightly scan its results) across the schema change."""
    if manifest.image_only_threshold is None:
        return manifest.fusion
    per_variant = {"image_only": manifest.image_only_threshold, "combined": manifest.threshold}
    return {**(manifest.fusion or {}), _LEGACY_THRESHOLDS: per_variant}
