"""`osteoscan models [list | show NAME]` through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from osteoscan.archs import create_model
from osteoscan.cli import app
from osteoscan.package import Manifest, MemberSpec, save_package

runner = CliRunner()


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch) -> Path:
    """An OSTEOSCAN_MODELS folder; the working directory has no ./models."""
    folder = tmp_path / "pkgs"
    folder.mkdir()
    monkeypatch.setenv("OSTEOSCAN_MODELS", str(folder))
    monkeypatch.chdir(tmp_path)
    # Hide the repository's bundled models/ so listings show only this test's packages.
    import osteoscan.cli.models as cli_models
    import osteoscan.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "search_dirs", lambda: [folder])
    monkeypatch.setattr(cli_models, "search_dirs", lambda: [folder])
    return folder


def _save(folder: Path, name: str) -> Path:
    manifest = Manifest(
        name=name,
        version="0.3.1",
        classes=["normal", "osteoporosis"],
        positive_classes=["osteoporosis"],
        threshold=0.27,
        body_parts=["knee", "spine"],
        members=[MemberSpec.for_arch("tiny_cnn", fold=0)],
        metrics={"roc_auc": {"value": 0.812, "ci95": [0.7, 0.9]}},
    )
    model = create_model("tiny_cnn", num_classes=2).eval()
    return save_package(folder / name, manifest, [model], card="# card\n")


def test_list_empty_is_not_an_error(models_dir: Path) -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "No model packages found" in result.output and str(models_dir) in result.output


def test_list_and_bare_models(models_dir: Path) -> None:
    path = _save(models_dir, "knee-test")
    for args in (["models"], ["models", "list"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        for text in ("knee-test", "0.3.1", "normal, osteoporosis", "knee, spine", "0.270"):
            assert text in result.output
        assert "1 (tiny_cnn)" in result.output and str(path) in result.output


def test_show(models_dir: Path) -> None:
    path = _save(models_dir, "knee-test")
    result = runner.invoke(app, ["models", "show", "knee-test", "--verify"])
    assert result.exit_code == 0, result.output
    assert str(path / "card.md") in result.output
    assert "ROC-AUC 0.812" in result.output and "sha256 verified" in result.output
    assert "tiny_cnn" in result.output
    result = runner.invoke(app, ["models", "show", str(path), "--json"])
    assert result.exit_code == 0 and '"threshold": 0.27' in result.output


def test_show_unknown_and_tampered(models_dir: Path) -> None:
    result = runner.invoke(app, ["models", "show", "nope"])
    assert result.exit_code == 1
    assert "model 'nope' not found" in result.output
    path = _save(models_dir, "knee-test")
    weights = next(path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    result = runner.invoke(app, ["models", "show", "knee-test", "--verify"])
    assert result.exit_code == 1 and weights.name in result.output
    assert runner.invoke(app, ["models", "show", "knee-test"]).exit_code == 0


def test_show_and_list_lines_are_not_padded(models_dir: Path) -> None:
    """Piped output: no line carries trailing spaces (a grid padded them to ~255 characters)."""
    _save(models_dir, "knee-test")
    for args in (["models", "show", "knee-test"], ["models", "list"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines and not [ln for ln in lines if ln != ln.rstrip()], args
    show = runner.invoke(app, ["models", "show", "knee-test"]).output.splitlines()
    assert show[0].split() == ["name", "knee-test", "0.3.1"]


def test_help_shows_no_bool_metavars() -> None:
    result = runner.invoke(app, ["models", "show", "-h"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    options = [ln for ln in result.output.splitlines() if "--help" not in ln]
    assert "--verify" in result.output and not [ln for ln in options if "<bool>" in ln]
