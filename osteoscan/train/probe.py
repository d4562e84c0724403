"""Linear-probe members: a frozen ImageNet backbone with a regularised logistic head.

On a few hundred radiographs, fine-tuning a CNN overfits: on the de-duplicated knee-xray set a
fine-tuned EfficientNet-Lite0 scored at chance out of fold, while a strongly regularised linear
model on its frozen, pooled features did better. This module fits that model with scikit-learn
(standardise → PCA → multinomial logistic regression, class-balanced) and then *folds* the whole
pipeline into the network's own final ``nn.Linear``, so a probe member is an ordinary model:
same package format, same ensemble code, same Grad-CAM.

Folding: with standardisation ``z = (f - mu) / sigma``, PCA ``p = (z - m) @ V.T`` and logits
``W p + b``, the composition is ``A f / sigma + b - A (mu / sigma + m)`` with ``A = W V``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import log_softmax
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from osteoscan.archs import final_linear
from osteoscan.preprocess import to_model_input
from osteoscan.train.loop import FitResult, TrainEvent, positive_auc

__all__ = ["extract_features", "fit_linear_probe"]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    arch: str,
    x: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 32,
    channels_last: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Pooled features (N, F): the input of the model's final linear layer, in eval mode;
    ``progress(done, total)`` after each batch (a CPU feature pass over thousands of images
    takes minutes)."""
    _, layer = final_linear(model, arch)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0].float().cpu()))
    model.eval().to(device)
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            model(to_model_input(xb, mean, std, channels_last=channels_last))
            if progress is not None:
                progress(min(i + batch_size, x.shape[0]), x.shape[0])
    finally:
        handle.remove()
    if not captured:
        return np.zeros((0, layer.in_features), dtype=np.float32)
    return torch.cat(captured).numpy().astype(np.float64)


def _fold_into_linear(
    layer: nn.Linear, scaler: StandardScaler, pca: PCA | None, clf: LogisticRegression, n: int
) -> None:
    coef = np.asarray(clf.coef_, dtype=np.float64)
    icpt = np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary sklearn model: one row, logit of class 1 vs class 0
        coef = np.vstack([-coef / 2, coef / 2])
        icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
    # Classes absent from the training rows get a very low logit rather than a missing row.
    full_w = np.zeros((n, coef.shape[1]))
    full_b = np.full(n, -50.0)
    full_w[clf.classes_] = coef
    full_b[clf.classes_] = icpt
    a = full_w @ pca.components_ if pca is not None else full_w
    shift = scaler.mean_ / scaler.scale_ + (pca.mean_ if pca is not None else 0.0)
    weight = a / scaler.scale_[None, :]
    bias = full_b - a @ shift
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))


def _fit_head(
    features: np.ndarray, y: np.ndarray, n_components: int, c: float, seed: int
) -> tuple[StandardScaler, PCA | None, LogisticRegression]:
    """Standardise → PCA (capped by the sample count) → balanced L2 logistic regression."""
    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    k = min(n_components, z.shape[0] - 1, z.shape[1])
    pca = PCA(n_components=k, random_state=seed).fit(z) if k >= 1 else None
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    clf.fit(pca.transform(z) if pca is not None else z, y)
    return scaler, pca, clf


def _checked_logits(
    layer: nn.Linear, f_val: np.ndarray, scaler: StandardScaler, pca: PCA | None,
    clf: LogisticRegression,
) -> np.ndarray:  # fmt: skip
    """Validation logits of the folded layer, checked against sklearn's own predictions."""
    with torch.no_grad():
        val_logits = layer(torch.as_tensor(f_val, dtype=layer.weight.dtype)).numpy()
    if len(f_val):
        z = scaler.transform(f_val)
        ref = clf.predict_log_proba(pca.transform(z) if pca is not None else z)
        got = log_softmax(val_logits[:, clf.classes_].astype(np.float64), axis=1)
        if not np.allclose(got, ref, atol=1e-3):
            raise RuntimeError("linear-probe folding does not reproduce the fitted model")
    return val_logits


def fit_linear_probe(
    model: nn.Module,
    arch: str,
    train_x: torch.Tensor,
    train_y: np.ndarray,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    *,
    n_classes: int,
    positive_idx: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    c: float = 0.01,
    n_components: int = 64,
    flip: bool = True,
    channels_last: bool = True,
    seed: int = 0,
    progress: Callable[[TrainEvent], None] | None = None,
    member: int = 0,
    n_members: int = 1,
) -> FitResult:
    """Fit a logistic head on frozen features and write it into ``model``'s final linear layer.

    ``flip`` adds each training image's horizontal mirror as a second sample (left and right
    knees are mirror images; it is the one augmentation that is free here). ``c`` is the inverse
    L2 strength; ``n_components`` the PCA size (capped by the sample count).
    """
    kw: dict[str, Any] = {
        "mean": mean, "std": std, "device": device, "channels_last": channels_last
    }  # fmt: skip

    def report(what: str) -> Callable[[int, int], None]:
        def fn(done: int, total: int) -> None:
            if progress is not None:
                progress(TrainEvent("progress", message=what, member=member,
                                    n_members=n_members, step=done, n_steps=total))  # fmt: skip

        return fn

    t0 = time.perf_counter()
    f_tr = extract_features(model, arch, train_x, **kw, progress=report("probe features"))
    y_tr = np.asarray(train_y)
    if flip:
        flipped = extract_features(model, arch, torch.flip(train_x, dims=[-1]), **kw,
                                   progress=report("probe features (mirrored)"))  # fmt: skip
        f_tr, y_tr = np.vstack([f_tr, flipped]), np.concatenate([y_tr, y_tr])
    rate = len(f_tr) / max(time.perf_counter() - t0, 1e-9)
    scaler, pca, clf = _fit_head(f_tr, y_tr, n_components, c, seed)
    _, layer = final_linear(model, arch)
    _fold_into_linear(layer, scaler, pca, clf, n_classes)
    # The folded network must reproduce sklearn exactly (up to float32): check, never assume.
    f_val = extract_features(model, arch, val_x, **kw, progress=report("probe features (val)"))
    val_logits = _checked_logits(layer, f_val, scaler, pca, clf)
    probs = torch.softmax(torch.as_tensor(val_logits), 1).numpy()
    auc = positive_auc(np.asarray(val_y), probs, positive_idx) if len(val_logits) else float("nan")
    history = [{"epoch": 1, "member": member, "val_auc": auc, "stage": "probe",
                "train_img_s": rate}]  # fmt: skip
    k = pca.n_components_ if pca is not None else 0
    if progress is not None:
        progress(TrainEvent(
            kind="epoch_end", member=member, n_members=n_members, stage="probe", epoch=1,
            n_epochs=1, metrics={"val_auc": auc, "train_img_s": rate},
            message=f"linear probe on {f_tr.shape[1]} features, PCA {k}, C={c}",
        ))  # fmt: skip
    state = {k_: v.detach().cpu().clone() for k_, v in model.state_dict().items()}
    return FitResult(state_dict=state, history=history, best_epoch=1, best_val_auc=float(auc),
                     val_logits=val_logits.astype(np.float32))  # fmt: skip
