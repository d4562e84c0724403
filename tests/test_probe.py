"""Tests for linear-probe members: the sklearn head folded into the network's final layer."""

from __future__ import annotations

import numpy as np
import torch

from osteoscan.archs import create_model, final_linear, get_arch
from osteoscan.testing.synthetic import synthetic_knee
from osteoscan.train.probe import extract_features, fit_linear_probe


def _texture_set(n: int, size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """Half dense (normal, 0) and half sparse (osteoporotic, 2) synthetic knees as uint16."""
    imgs, labels = [], []
    for i in range(n):
        label = 2 if i % 2 else 0
        img = synthetic_knee(size, seed=i, density=0.3 if label else 1.0)
        imgs.append(np.round(img * 65535).astype(np.uint16))
        labels.append(label)
    x = torch.from_numpy(np.stack(imgs)[:, None])
    return x, np.array(labels)


def test_probe_folds_into_the_final_linear_and_learns() -> None:
    torch.manual_seed(0)
    spec = get_arch("tiny_cnn")
    model = create_model("tiny_cnn", 3)
    x_tr, y_tr = _texture_set(40)
    x_va, y_va = _texture_set(20)
    x_va = x_va.roll(1, dims=0)  # other images than training (different seeds per position)
    y_va = np.roll(y_va, 1)
    kw = {"mean": spec.mean, "std": spec.std, "device": torch.device("cpu")}
    before = extract_features(model, "tiny_cnn", x_va, **kw)
    res = fit_linear_probe(
        model, "tiny_cnn", x_tr, y_tr, x_va, y_va, n_classes=3, positive_idx=[2], c=1.0, **kw
    )
    # The backbone is untouched: features are the same before and after fitting the head.
    np.testing.assert_allclose(extract_features(model, "tiny_cnn", x_va, **kw), before, atol=1e-5)
    # The network's own logits are the probe's: the absent class gets a very low logit.
    _, layer = final_linear(model, "tiny_cnn")
    logits = layer(torch.as_tensor(before, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(logits, res.val_logits, atol=1e-4)
    assert (logits[:, 1] < -20).all()
    assert res.best_val_auc > 0.9  # dense vs sparse texture is separable from pooled features
    assert set(res.state_dict) == set(model.state_dict())


def test_probe_binary_labels_give_full_width_logits() -> None:
    torch.manual_seed(1)
    spec = get_arch("tiny_cnn")
    model = create_model("tiny_cnn", 2)
    x, y = _texture_set(24)
    y = (y == 2).astype(int)
    res = fit_linear_probe(
        model, "tiny_cnn", x, y, x, y, n_classes=2, positive_idx=[1],
        mean=spec.mean, std=spec.std, device=torch.device("cpu"), c=1.0, flip=False,
    )  # fmt: skip
    probs = torch.softmax(torch.as_tensor(res.val_logits), 1).numpy()
    assert probs.shape == (24, 2)
    assert ((probs[:, 1] > 0.5) == (y == 1)).mean() > 0.8


def test_probe_feature_pass_reports_progress_and_speed() -> None:
    """The feature pass (minutes on thousands of CPU images) reports every batch."""
    torch.manual_seed(0)
    spec = get_arch("tiny_cnn")
    model = create_model("tiny_cnn", 3)
    x_tr, y_tr = _texture_set(20, size=32)
    x_va, y_va = _texture_set(8, size=32)
    events = []
    res = fit_linear_probe(
        model, "tiny_cnn", x_tr, y_tr, x_va, y_va, n_classes=3, positive_idx=[2], c=1.0,
        mean=spec.mean, std=spec.std, device=torch.device("cpu"), progress=events.append,
    )  # fmt: skip
    steps = [(e.message, e.step, e.n_steps) for e in events if e.kind == "progress"]
    assert ("probe features", 20, 20) in steps and ("probe features (val)", 8, 8) in steps
    assert ("probe features (mirrored)", 20, 20) in steps
    assert res.history[0]["train_img_s"] > 0
