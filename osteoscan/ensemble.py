"""Run a model package's ensemble on a batch: calibrated probabilities, score, flag, heatmaps.

One :meth:`Ensemble.predict` call does, per member: device-side normalisation
(:func:`osteoscan.preprocess.to_model_input`) → logits → ``/ temperature`` → softmax. Ensemble
probabilities are the mean over members; covariate fusion (:mod:`osteoscan.fusion`) is applied to
rows that carry age / sex; ``score`` is the sum of the positive-class probabilities, ``flagged``
is ``score >= threshold`` and ``uncertainty`` the standard deviation of the members' (image-only)
scores. Rows that need a heatmap go through the same forward pass with gradients enabled
(:mod:`osteoscan.gradcam`); all other rows run under ``torch.inference_mode()``. With
``heatmaps="flagged"`` every row takes the Grad-CAM forward (autograd recorded for the small head
only) and, once the fused score is known, only the flagged rows are backpropagated: heatmaps for
exactly the flagged images from one forward pass.

Members whose trunks (every weight outside the head) are identical - probe heads on one frozen
backbone - run the backbone once per batch and each head on the shared features
(:mod:`osteoscan.trunks`); which members share is decided from the weights' digests when the
ensemble is built. Their Grad-CAM maps come from the one shared activation, each through its own
head's gradient, and are fused as before.

On CUDA the forward runs under autocast (bf16 where the GPU supports it, else fp16) with
channels_last weights and inputs; on CPU never autocast (slow and inexact there), only
channels_last, and each trunk up to its Grad-CAM layer runs as one frozen oneDNN graph where the
architecture allows (:mod:`osteoscan.fastpath`: ~1.7x, probabilities within 1e-5 of the eager
model); plain and Grad-CAM rows take their activation from the same graph.

Members trained with ``test_time_flip`` (``MemberSpec``) score each image and its mirror image
and average the two logits (twice the cost; the heatmap comes from the image as given).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osteoscan.archs import get_arch, get_module
from osteoscan.fusion import apply_fusion, validate_fusion
from osteoscan.gradcam import CamForward, cam_from_forward, fuse_cams
from osteoscan.grades import grade_cutoffs_of, predict_classes
from osteoscan.preprocess import to_model_input
from osteoscan.trunks import TrunkGroup, trunk_groups


class _HasCovariates(Protocol):
    """What :meth:`Ensemble.predict` reads from a covariates object (``osteoscan.covariates``)."""

    @property
    def age(self) -> float | None: ...

    @property
    def sex(self) -> str | None: ...


@dataclass
class BatchPrediction:
    """Per-row results of one batch; arrays are NumPy on the host.

    ``probs`` (B, C) float32 — calibrated ensemble probabilities, fused with covariates where used;
    ``member_probs`` (B, M, C) — each member's calibrated, image-only probabilities;
    ``score`` (B,) — sum of positive-class ``probs``; ``flagged`` (B,) bool — ``score >=
    threshold``; ``uncertainty`` (B,) — std (ddof 0) of the members' image-only scores;
    ``prediction`` — most probable class name; ``covariates_used`` — ``"age,sex"``, ``"age"``,
    ``"sex"`` or ``""``; ``heatmaps`` — float32 (H, W) in [0, 1] at model input size, or None
    where not asked; ``threshold`` — the package's (or the user's) threshold; ``thresholds`` (B,)
    — the one applied to each row (image-only and fused scores have their own, see
    :meth:`Ensemble._row_thresholds`).
    """

    probs: np.ndarray
    member_probs: np.ndarray
    score: np.ndarray
    flagged: np.ndarray
    uncertainty: np.ndarray
    prediction: list[str]
    covariates_used: list[str]
    heatmaps: list[np.ndarray | None]
    threshold: float
    thresholds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prediction)


def _heatmap_request(
    heatmaps: Sequence[bool] | Literal["flagged"] | None, batch: int
) -> tuple[np.ndarray, bool]:
    """``(rows asked for, flagged_only)`` from :meth:`Ensemble.predict`'s ``heatmaps``."""
    flagged_only = isinstance(heatmaps, str)
    if flagged_only and heatmaps != "flagged":
        raise ValueError(f"heatmaps must be a sequence of bools or 'flagged', not {heatmaps!r}")
    if flagged_only or heatmaps is None:
        want = np.full(batch, flagged_only, dtype=bool)
    else:
        want = np.asarray(heatmaps, dtype=bool)
    if want.shape != (batch,):
        raise ValueError(f"heatmaps must have {batch} entries, got {want.shape}")
    return want, flagged_only


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resolve_amp(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype for ``device``: None on CPU (always) or when ``amp`` is False; on CUDA
    bfloat16 where supported, else float16. ``amp=None`` means "on for CUDA"."""
    if device.type != "cuda" or amp is False:
        return None
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Ensemble:
    """A loaded model package placed on a device, ready to score uint16 batches.

    ``pkg`` is an :class:`osteoscan.package.ModelPackage` (``path``, ``manifest``, ``members``).
    Members are moved to ``device`` once (channels_last by default) and put in eval mode.
    ``cam_layers`` optionally overrides each member's Grad-CAM layer (dotted module path);
    by default it comes from the architecture registry (``get_arch(arch).cam_layer``).
    ``share_trunks=False`` runs every member's whole model even where trunks are identical.
    ``fast_cpu=False`` keeps the eager trunks on CPU (see :mod:`osteoscan.fastpath`).
    """

    def __init__(
        self,
        pkg: Any,
        device: torch.device | str = "cpu",
        amp: bool | None = None,
        channels_last: bool = True,
        *,
        cam_layers: Sequence[str] | None = None,
        share_trunks: bool = True,
        fast_cpu: bool = True,
    ) -> None:
        self.package = pkg
        self.manifest = pkg.manifest
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.amp_dtype = resolve_amp(self.device, amp)
        specs = list(self.manifest.members)
        if len(specs) != len(pkg.members) or not specs:
            raise ValueError(
                f"package has {len(specs)} member specs but {len(pkg.members)} member models"
            )
        self.specs = specs
        self.classes: list[str] = list(self.manifest.classes)
        self.positive_classes: list[str] = list(self.manifest.positive_classes)
        missing = [c for c in self.positive_classes if c not in self.classes]
        if missing or not self.positive_classes:
            raise ValueError(f"positive classes {self.positive_classes} not all in {self.classes}")
        self.positive_idx = [self.classes.index(c) for c in self.positive_classes]
        self.threshold = float(self.manifest.threshold)
        self.body_parts: list[str] = list(self.manifest.body_parts)
        self.fusion: dict[str, Any] | None = self.manifest.fusion or None
        # Ordinal models report the grade their fitted cut-offs give, others the argmax.
        self.grade_cutoffs = grade_cutoffs_of(self.manifest.target)
        if self.fusion is not None:
            validate_fusion(self.fusion, len(self.classes))
            if list(self.fusion["classes"]) != self.classes:
                raise ValueError(f"fusion classes {self.fusion['classes']} != {self.classes}")
        size = (self.manifest.preprocess or {}).get("size") or specs[0].input_size
        self.input_size: int | tuple[int, int] = size if isinstance(size, int) else _pair(size)
        self.temperatures = [1.0 if s.temperature is None else float(s.temperature) for s in specs]
        self._flip = [bool(s.test_time_flip) for s in specs]
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"member temperatures must be positive, got {self.temperatures}")
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.models: list[nn.Module] = [
            m.to(device=self.device, memory_format=fmt).eval() for m in pkg.members
        ]
        paths = [get_arch(s.arch).cam_layer for s in specs] if cam_layers is None else cam_layers
        self._cam_paths = list(paths)
        self._cam_modules: list[nn.Module] | None = None
        # Members with identical trunk weights (and input, Grad-CAM layer) run the trunk once.
        self.groups: list[TrunkGroup] = trunk_groups(
            self.models,
            [s.arch for s in specs],
            [(s.mean, s.std, s.input_size, p) for s, p in zip(specs, self._cam_paths, strict=True)],
            share=share_trunks,
        )
        if fast_cpu and self.device.type == "cpu" and self.amp_dtype is None:
            for g in self.groups:
                size = self.specs[g.members[0]].input_size or self.input_size
                g.enable_fast(get_module(self.models[g.members[0]], self._cam_paths[g.members[0]]),
                              _pair(size))  # fmt: skip

    # ------------------------------------------------------------------ helpers
    @property
    def n_members(self) -> int:
        """Number of ensemble members."""
        return len(self.models)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _cam_layer_modules(self) -> list[nn.Module]:
        if self._cam_modules is None:
            pairs = zip(self.models, self._cam_paths, strict=True)
            self._cam_modules = [get_module(m, p) for m, p in pairs]
        return self._cam_modules

    def _to_device(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, H, W) batch, got shape {tuple(x.shape)}")
        return x.to(self.device, non_blocking=True)

    def _member_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Model input per member; members sharing normalisation and size share one tensor."""
        cache: dict[tuple[Any, ...], torch.Tensor] = {}
        out = []
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        with torch.no_grad():  # normal (not inference) tensors: Grad-CAM rows are sliced from them
            for spec in self.specs:
                size = _pair(spec.input_size) if spec.input_size else hw
                key = (tuple(spec.mean), tuple(spec.std), size)
                if key not in cache:
                    xin = to_model_input(x, spec.mean, spec.std, channels_last=False)
                    if size != hw:  # a member trained at another resolution
                        xin = F.interpolate(
                            xin,
                            size=size,
                            mode="bilinear",
                            align_corners=False,
                            antialias=size[0] < hw[0],
                        )
                    if self.channels_last:
                        xin = xin.contiguous(memory_format=torch.channels_last)
                    cache[key] = xin
                out.append(cache[key])
        return out

    def _rows(self, xin: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Advanced indexing returns NCHW-contiguous rows; a channels_last model fed NCHW input
        # falls back to slow conversions, so restore the layout.
        rows = xin.index_select(0, idx)
        return rows.contiguous(memory_format=torch.channels_last) if self.channels_last else rows

    # ------------------------------------------------------------------ inference
    def predict_member_logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw member logits ``(M, B, C)`` float32 on the device — no temperature, no softmax.

        For training-time calibration and evaluation; runs under ``inference_mode``. Members
        with ``test_time_flip`` give the mean over the image and its mirror.
        """
        x = self._to_device(x)
        return self._mirror_average(x, self._plain_logits(x))

    def _mirror_average(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with each flipping member's row averaged with its mirror-image logits.

        The mirror runs without Grad-CAM: a heatmap explains the image as given, and its score
        differs from the reported one only by the mirror's share.
        """
        if not any(self._flip):
            return logits
        mirrored = self._plain_logits(x.flip(-1))
        mask = torch.tensor(self._flip, device=logits.device).view(-1, 1, 1)
        with torch.inference_mode():
            return torch.where(mask, (logits + mirrored) / 2, logits)

    def _plain_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits for the (device) batch ``x`` as given, under inference_mode."""
        inputs = self._member_inputs(x)
        logits: list[torch.Tensor | None] = [None] * self.n_members
        with torch.inference_mode(), self._autocast():
            for g in self.groups:
                for m, lg in zip(g.members, g.logits(inputs[g.members[0]]), strict=True):
                    logits[m] = lg
        return torch.stack([lg for lg in logits if lg is not None])

    def _forward(
        self, x: torch.Tensor, grad_rows: np.ndarray
    ) -> tuple[torch.Tensor, list[CamForward]]:
        """Member logits (M, B, C) for all rows; ``grad_rows`` go through Grad-CAM forwards
        (kept open, one per member in member order, over those rows in order), the rest under
        inference_mode. Each trunk group (:attr:`groups`) runs its trunk once."""
        hm_idx = torch.from_numpy(np.flatnonzero(grad_rows)).to(self.device)
        if len(hm_idx) == 0:
            return self.predict_member_logits(x), []
        plain_idx = torch.from_numpy(np.flatnonzero(~grad_rows)).to(self.device)
        inputs = self._member_inputs(x)
        cams = self._cam_layer_modules()
        autocast: Callable[[], contextlib.AbstractContextManager[object]] = self._autocast
        shape = (x.shape[0], len(self.classes))
        logits = [torch.empty(shape, device=self.device) for _ in range(self.n_members)]
        forwards: list[CamForward | None] = [None] * self.n_members
        for g in self.groups:
            xin = inputs[g.members[0]]
            if len(plain_idx):
                with torch.inference_mode(), autocast():
                    plain = g.logits(self._rows(xin, plain_idx))
                for m, lg in zip(g.members, plain, strict=True):
                    logits[m][plain_idx] = lg
            fws = g.cam_forwards(cams[g.members[0]], self._rows(xin, hm_idx), autocast)
            for m, fw in zip(g.members, fws, strict=True):
                logits[m][hm_idx] = fw.logits.detach().float()
                forwards[m] = fw
        return self._mirror_average(x, torch.stack(logits)), [f for f in forwards if f is not None]

    def _empty(self) -> BatchPrediction:
        n_cls = len(self.classes)
        return BatchPrediction(
            probs=np.zeros((0, n_cls), np.float32),
            member_probs=np.zeros((0, self.n_members, n_cls), np.float32),
            score=np.zeros(0, np.float32),
            flagged=np.zeros(0, bool),
            uncertainty=np.zeros(0, np.float32),
            prediction=[],
            covariates_used=[],
            heatmaps=[],
            threshold=self.threshold,
        )

    def predict(
        self,
        x: torch.Tensor | np.ndarray,
        covariates: Sequence[_HasCovariates | None] | None = None,
        heatmaps: Sequence[bool] | Literal["flagged"] | None = None,
        threshold: float | None = None,
    ) -> BatchPrediction:
        """Score a ``uint16`` (B, 1, H, W) batch (preprocessed by :func:`preprocess`).

        ``covariates[i]`` (an object with ``age`` / ``sex``, or None) feeds covariate fusion when
        the package has one; ``heatmaps[i]`` asks for a Grad-CAM map for row ``i``, and
        ``heatmaps="flagged"`` gives one for exactly the rows that end up flagged, from the same
        forward pass (every row's forward records the small head graph; only flagged rows are
        backpropagated). ``threshold`` overrides the package's screening threshold.
        """
        x = self._to_device(x)
        batch = int(x.shape[0])
        want, flagged_only = _heatmap_request(heatmaps, batch)
        if covariates is not None and len(covariates) != batch:
            raise ValueError(f"covariates must have {batch} entries, got {len(covariates)}")

        if batch == 0:
            return self._empty()
        logits, forwards = self._forward(x, want)
        temps = torch.tensor(self.temperatures, device=logits.device).view(-1, 1, 1)
        member_probs = torch.softmax(logits / temps, dim=-1)  # (M, B, C)
        member_probs_np = member_probs.permute(1, 0, 2).cpu().numpy().astype(np.float32)
        image_probs = member_probs_np.mean(axis=1)
        member_scores = member_probs_np[:, :, self.positive_idx].sum(axis=2)  # (B, M)
        uncertainty = member_scores.std(axis=1).astype(np.float32)

        if covariates is not None and self.fusion is not None:
            ages = [getattr(c, "age", None) if c is not None else None for c in covariates]
            sexes = [getattr(c, "sex", None) if c is not None else None for c in covariates]
            probs, used = apply_fusion(self.fusion, image_probs, ages, sexes)
        else:
            probs, used = image_probs.astype(np.float32), [""] * batch

        thr = self.threshold if threshold is None else float(threshold)
        row_thr = self._row_thresholds(used, threshold)
        score = probs[:, self.positive_idx].sum(axis=1).astype(np.float32)
        flagged = score >= row_thr
        # "flagged": every row went through the open Grad-CAM forward (about inference cost);
        # now that the fused score is known, backpropagate for the flagged rows only.
        hm_rows = np.flatnonzero(flagged if flagged_only else want)
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        hm_list = self._heatmaps(forwards, hm_rows, batch, hw, select=flagged_only)
        return BatchPrediction(
            probs=probs.astype(np.float32),
            member_probs=member_probs_np,
            score=score,
            flagged=flagged,
            uncertainty=uncertainty,
            prediction=[self.classes[k] for k in predict_classes(probs, self.grade_cutoffs)],
            covariates_used=used,
            heatmaps=hm_list,
            threshold=thr,
            thresholds=row_thr,
        )

    def _heatmaps(
        self,
        forwards: list[CamForward],
        rows: np.ndarray,
        batch: int,
        hw: tuple[int, int],
        *,
        select: bool,
    ) -> list[np.ndarray | None]:
        """Fused Grad-CAM maps for ``rows`` of the open forwards (``None`` for other rows).

        ``select``: the forwards hold every row of the batch and only ``rows`` are
        backpropagated; otherwise they hold exactly ``rows``.
        """
        out: list[np.ndarray | None] = [None] * batch
        if not forwards or not len(rows):
            return out
        sel = torch.from_numpy(rows).to(self.device) if select else None
        # Members of a trunk group share the activation and the graph up to their heads: every
        # backward but the graph's last user must keep it.
        last_user = {id(fw.act): m for m, fw in enumerate(forwards)}
        raw_maps = []
        for m, (fw, t) in enumerate(zip(forwards, self.temperatures, strict=True)):
            keep = last_user[id(fw.act)] != m
            cam = cam_from_forward(fw, self.positive_idx, t, hw, sel, retain_graph=keep)
            raw_maps.append(cam)
        forwards.clear()  # free the graphs before fusing
        fused = fuse_cams(raw_maps).cpu().numpy().astype(np.float32)
        for j, i in enumerate(rows):
            out[i] = fused[j]
        return out

    def _row_thresholds(self, used: Sequence[str], override: float | None) -> np.ndarray:
        """Threshold per row: an image-only score and a fused score live on different scales.

        The trainer chooses ``Manifest.threshold`` (fused rows) and ``image_only_threshold`` for
        the target sensitivity, each on its own held-out scores; rows use the one matching how
        they were scored (:meth:`Manifest.threshold_for`). A user ``--threshold`` applies to every
        row.
        """
        if override is not None:
            return np.full(len(used), float(override), dtype=np.float32)
        return np.array([self.manifest.threshold_for(bool(u)) for u in used], dtype=np.float32)
