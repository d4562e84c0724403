"""train and evaluate load files exactly as scan's load stage does (issue 10).

A folder holding a chest DICOM, a decompression bomb (a header claiming 60000 x 60000 pixels) and
a multi-frame knee DICOM: both commands must skip the chest, refuse the bomb with an error and use
every frame of the multi-frame file, one record per frame, like :mod:`osteoscan.load`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from osteoscan.load import single_model_loader
from osteoscan.preprocess import PreprocessConfig
from osteoscan.testing import synthetic

N_FRAMES = 3


def _bomb(path: Path) -> Path:
    """A valid knee DICOM whose header then claims 60000 x 60000 pixels."""
    synthetic.write_dicom(path, synthetic.synthetic_knee(64, seed=7))
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns that the pixel data is too short
        ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path, enforce_file_format=False)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """normal/ and osteoporosis/ with PNG knees, plus the three special files."""
    root = tmp_path_factory.mktemp("load-stage")
    for c, (label, density) in enumerate((("normal", 1.0), ("osteoporosis", 0.3))):
        for i in range(8):
            img = synthetic.synthetic_knee(64, seed=30 * c + i, density=density)
            synthetic.write_png(root / label / f"{label[:3]}{i}.png", img)
    synthetic.write_dicom(
        root / "normal" / "chest.dcm", synthetic.synthetic_chest(64), body_part="CHEST"
    )
    _bomb(root / "normal" / "bomb.dcm")
    frames = np.stack(
        [synthetic.synthetic_knee(64, seed=90 + k, density=0.3) for k in range(N_FRAMES)]
    )
    synthetic.write_dicom(root / "osteoporosis" / "multi.dcm", frames)
    return root


def _scan_view(path: Path, cfg: PreprocessConfig) -> list[tuple[int, str]]:
    """(frame, status) of each record scan's load stage gives for ``path``."""
    return [(r.frame, r.status) for r in single_model_loader(cfg, ["knee"])(path)]


def test_scan_load_stage_on_the_special_files(folder: Path) -> None:
    cfg = PreprocessConfig(size=32)
    assert _scan_view(folder / "normal" / "chest.dcm", cfg) == [(0, "skipped")]
    assert _scan_view(folder / "normal" / "bomb.dcm", cfg) == [(0, "error")]
    assert _scan_view(folder / "osteoporosis" / "multi.dcm", cfg) == [
        (k, "ok") for k in range(N_FRAMES)
    ]


def test_train_data_loading_matches_the_load_stage(folder: Path) -> None:
    from osteoscan.train.cache import ImageCache
    from osteoscan.train.data import load_labelled
    from osteoscan.train.dedup import find_duplicates
    from osteoscan.train.images import build_training_set

    cfg = PreprocessConfig(size=32)
    files, _ = load_labelled(folder)
    records = ImageCache(cfg).load_all([f.path for f in files], workers=1)
    for f, recs in zip(files, records, strict=True):
        assert [(r.frame, r.status) for r in recs] == _scan_view(f.path, cfg), f.path
    ts = build_training_set(files, records)
    ((chest, why),) = ts.not_used("skipped")
    assert Path(chest).name == "chest.dcm" and "chest" in why.lower()
    assert [p for p, _ in ts.not_used("error")] == [str(folder / "normal" / "bomb.dcm")]
    multi = [i for i, s in enumerate(ts.samples) if s.path.name == "multi.dcm"]
    assert len(multi) == N_FRAMES and len(ts.samples) == 16 + N_FRAMES
    assert (
        ts.line() == f"read 17/19 images usable, {16 + N_FRAMES} frames (1 unreadable, 1 skipped)"
    )
    # The frames of one file share a split group.
    dedup = find_duplicates(ts.samples, [it.fingerprint for it in ts.items])
    assert len({dedup.group_of[i] for i in multi}) == 1
    assert sorted(n for n in ts.frame_names() if "multi.dcm" in n)[-1].endswith(f"#{N_FRAMES - 1}")


def test_train_uses_every_frame_and_keeps_a_files_frames_in_one_part(
    folder: Path, tmp_path: Path
) -> None:
    from osteoscan.train.recipe import make_config
    from osteoscan.train.trainer import train_models

    cfg = make_config(
        None, data=folder, archs=("tiny_cnn",), random_init=True, size=32, epochs=1,
        stage1_epochs=0, batch_size=4, n_boot=20, folds=3, read_workers=1,
        allow_unreadable=True, name="t",
    )  # fmt: skip
    events: list = []
    res = train_models(cfg, progress=events.append)
    td = res.manifest.training_data
    assert td["n_files"] == 19 and td["n_images"] == 16 + N_FRAMES
    assert (td["n_unreadable"], td["n_skipped"]) == (1, 1)
    assert {(r["path"], r["status"]) for r in td["not_used"]} == {
        ("normal/bomb.dcm", "error"), ("normal/chest.dcm", "skipped")
    }  # fmt: skip
    folds = td["split"]["folds"]
    holding = [k for k, f in enumerate(folds) if any("multi.dcm#" in p for p in f["val"]["paths"])]
    assert len(holding) == 1  # every frame held out in the same fold
    assert sum("multi.dcm#" in p for p in folds[holding[0]]["val"]["paths"]) == N_FRAMES
    phases = [e.message for e in events if e.kind == "phase"]
    assert "read 17/19 images usable, 19 frames (1 unreadable, 1 skipped)" in phases


def test_evaluate_reports_skipped_error_and_one_row_per_frame(folder: Path, tiny_package) -> None:
    from osteoscan.evaluate import evaluate_model

    rep = evaluate_model(folder, tiny_package(size=32), n_boot=0)
    rows = {(Path(r["path"]).name, r["frame"]): r["status"] for r in rep["frames"]}
    assert rows[("chest.dcm", 0)] == "skipped" and rows[("bomb.dcm", 0)] == "error"
    assert [rows[("multi.dcm", k)] for k in range(N_FRAMES)] == ["ok"] * N_FRAMES
    assert len(rep["frames"]) == 18 + N_FRAMES
    assert rep["data"]["n_scored"] == 16 + N_FRAMES == rep["n"]
    assert (rep["data"]["n_errors"], rep["data"]["n_skipped"]) == (1, 1)
    assert [Path(e["path"]).name for e in rep["skipped"]] == ["chest.dcm"]
    assert [Path(e["path"]).name for e in rep["errors"]] == ["bomb.dcm"]
    for rec in rep["frames"]:  # the same statuses as scan's load stage
        view = _scan_view(Path(rec["path"]), PreprocessConfig(size=32))
        assert (rec["frame"], rec["status"]) in view
