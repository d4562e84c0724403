"""Tests for loading labelled data (folder per class, labels CSV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from osteoscan.errors import UsageError
from osteoscan.testing.synthetic import write_png
from osteoscan.train.data import canonical_class, load_labelled, resolve_positive

KNEE = Path("/work/shared/data/knee-xray")


def _img(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_png(path, rng.random((20, 24), dtype=np.float32), bits=8)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("normal", "normal"),
        ("Healthy", "normal"),
        ("NORMAL ", "normal"),
        ("osteopenia", "osteopenia"),
        ("Osteoporosis", "osteoporosis"),
        ("OS", "osteoporosis"),
        ("osteoporotic", "osteoporosis"),
        ("0_normal", "normal"),
        ("2-Osteoporosis", "osteoporosis"),
        ("low_bone_mass", "osteopenia"),
        ("cats", None),
        ("OP", None),
    ],
)
def test_canonical_class(name: str, want: str | None) -> None:
    assert canonical_class(name) == want


def test_folder_per_class_with_aliases_and_groups(tmp_path: Path) -> None:
    _img(tmp_path / "Osteoporosis" / "b.png", 1)
    _img(tmp_path / "Osteoporosis" / "a.png", 2)
    _img(tmp_path / "healthy" / "x.png", 3)
    _img(tmp_path / "healthy" / "patient7" / "y1.png", 4)
    _img(tmp_path / "healthy" / "patient7" / "y2.png", 5)
    (tmp_path / "healthy" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("top-level files are ignored")
    samples, classes = load_labelled(tmp_path)
    assert classes == ["normal", "osteoporosis"]  # canonical order, binary set
    assert [str(s.path) for s in samples] == sorted(str(s.path) for s in samples)
    got = {s.path.name: (s.label, s.group) for s in samples}
    assert got == {
        "x.png": ("normal", None),
        "y1.png": ("normal", "patient7"),
        "y2.png": ("normal", "patient7"),
        "a.png": ("osteoporosis", None),
        "b.png": ("osteoporosis", None),
    }


def test_any_folder_name_is_a_class_and_positive_must_be_named(tmp_path: Path) -> None:
    _img(tmp_path / "normal" / "a.png")
    _img(tmp_path / "fractured" / "b.png")
    samples, classes = load_labelled(tmp_path)
    assert classes == ["fractured", "normal"]  # not the osteoporosis set: alphabetical
    # Nobody can guess which class is positive: the error names the classes and the aliases.
    with pytest.raises(UsageError, match="--positive is required") as err:
        resolve_positive(classes, ())
    assert "fractured" in str(err.value) and "healthy" in str(err.value)
    assert resolve_positive(classes, ("fractured",)) == ("fractured",)
    assert resolve_positive(["normal", "osteoporosis"], ()) == ("osteoporosis",)
    assert resolve_positive(["normal", "osteoporosis"], ("Osteoporotic",)) == ("osteoporosis",)
    with pytest.raises(UsageError, match="not among"):
        resolve_positive(classes, ("broken",))


def test_single_class_and_empty_are_usage_errors(tmp_path: Path) -> None:
    _img(tmp_path / "normal" / "a.png")
    with pytest.raises(UsageError, match="two classes"):
        load_labelled(tmp_path)
    with pytest.raises(UsageError, match="no such"):
        load_labelled(tmp_path / "missing")


def test_labels_csv(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "1.png", 1)
    _img(tmp_path / "imgs" / "2.png", 2)
    abs_img = _img(tmp_path / "other" / "3.png", 3)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        f"Path,Label,Group\nimgs/1.png,osteopenia,p1\nimgs/2.png,Normal,\n{abs_img},OS,p1\n"
    )
    samples, classes = load_labelled(csv)
    assert classes == ["normal", "osteopenia", "osteoporosis"]
    by_name = {s.path.name: s for s in samples}
    assert by_name["1.png"].label == "osteopenia" and by_name["1.png"].group == "p1"
    assert by_name["2.png"].label == "normal" and by_name["2.png"].group is None
    assert by_name["3.png"].label == "osteoporosis" and by_name["3.png"].path == abs_img


def test_labels_csv_errors(tmp_path: Path) -> None:
    _img(tmp_path / "1.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,\n")
    with pytest.raises(UsageError, match="empty label"):
        load_labelled(csv)
    csv.write_text("path,label\n1.png,normal\nmissing.png,osteoporosis\n")
    with pytest.raises(UsageError, match="missing.png"):
        load_labelled(csv)
    csv.write_text("file,class\n1.png,normal\n")
    with pytest.raises(UsageError, match="path,label"):
        load_labelled(csv)


@pytest.mark.skipif(not KNEE.is_dir(), reason="knee-xray data not present")
def test_knee_xray_folders() -> None:
    samples, classes = load_labelled(KNEE)
    assert classes == ["normal", "osteopenia", "osteoporosis"]
    counts = {c: sum(s.label == c for s in samples) for c in classes}
    assert counts == {"normal": 29, "osteopenia": 122, "osteoporosis": 39}
