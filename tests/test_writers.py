"""Results CSV / flagged CSV / HDF5 / heatmap PNG writers: schema, atomicity, round trips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from osteoscan.errors import OutputError
from osteoscan.rows import (
    COLUMNS_AFTER_PROBS,
    COLUMNS_BEFORE_PROBS,
    ResultRow,
    result_columns,
    union_classes,
)
from osteoscan.writers import (
    CsvResultsWriter,
    Hdf5ResultsWriter,
    heatmap_name,
    read_hdf5,
    write_heatmap_png,
)

CLASSES = ["normal", "osteopenia", "osteoporosis"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def test_columns_follow_design_md() -> None:
    assert result_columns(CLASSES) == [
        "path", "frame", "image_id", "status", "reason", "body_part", "model",
        "p_normal", "p_osteopenia", "p_osteoporosis", "prediction", "score", "threshold",
        "flagged", "uncertainty", "heatmap", "scanned_at", "covariates",
    ]  # fmt: skip
    assert set(COLUMNS_BEFORE_PROBS + COLUMNS_AFTER_PROBS) < set(result_columns(CLASSES))
    with_t = result_columns(CLASSES, tscore=True)  # a T-score model's results
    assert with_t[with_t.index("uncertainty") + 1] == "tscore" and len(with_t) == 19
    assert union_classes([["normal", "osteoporosis"], CLASSES]) == [
        "normal", "osteoporosis", "osteopenia"
    ]  # fmt: skip


def _row(i: int, score: float | None, status: str = "ok") -> ResultRow:
    row = {"path": f"/a/{i}.png", "frame": 0, "image_id": f"id{i}", "status": status}
    if score is not None:
        row.update(score=score, flagged=score >= 0.5, threshold=0.5, p_normal=1 - score)
    return ResultRow.from_dict(row)


def test_csv_streams_rows_in_order_and_publishes_on_commit(tmp_path: Path) -> None:
    out = tmp_path / "res" / "results.csv"
    w = CsvResultsWriter(out, result_columns(CLASSES))
    w.write_rows([_row(0, 0.6), _row(1, 0.2), _row(2, None, "error")])
    w.write_rows([_row(3, 0.9), _row(4, 0.55)])
    assert not out.exists()  # nothing published before commit
    w.commit()
    header, rows = read_csv(out)
    assert header == result_columns(CLASSES) and len(rows) == 5
    assert [r["image_id"] for r in rows] == ["id0", "id1", "id2", "id3", "id4"]
    assert rows[0]["flagged"] == "true" and rows[1]["flagged"] == "false"
    assert rows[0]["score"] == "0.600000" and rows[2]["score"] == ""
    assert not list((tmp_path / "res").glob(".*.tmp"))


def test_abort_keeps_previous_results(tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    out.write_text("previous\n")
    w = CsvResultsWriter(out, result_columns(CLASSES))
    w.write_rows([_row(0, 0.7)])
    w.abort()
    assert out.read_text() == "previous\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_unwritable_folder_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        CsvResultsWriter(blocker / "results.csv", result_columns(CLASSES))


def test_hdf5_round_trip_and_heatmap_chunks(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "r.h5"
    w = Hdf5ResultsWriter(path, CLASSES, 2, (16, 16), {"m 1": {"name": "m", "version": "1"}})
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=3).astype(np.float32)
    member = np.stack([probs, probs], axis=1)
    hms = [rng.random((16, 16), dtype=np.float32), None, rng.random((32, 32), dtype=np.float32)]
    rows = [_row(i, float(probs[i, 1:].sum())) for i in range(3)]
    for row in rows:
        row.model = "m 1"
    w.write(rows[:2], probs[:2], member[:2], hms[:2])
    w.write(rows[2:], probs[2:], member[2:], hms[2:])
    w.commit()
    d = read_hdf5(path)
    assert d["image_id"] == ["id0", "id1", "id2"] and d["model"] == ["m 1"] * 3
    np.testing.assert_allclose(d["probs"], probs)
    assert d["member_probs"].shape == (3, 2, 3)
    assert d["heatmaps"].shape == (3, 16, 16) and d["heatmaps"].dtype == np.float16
    assert list(d["has_heatmap"]) == [True, False, True]
    assert np.abs(d["heatmaps"][0] - hms[0]).max() < 1e-3
    assert not d["heatmaps"][1].any()
    assert d["heatmaps"].min() >= 0.0 and d["heatmaps"].max() <= 1.0
    assert json.loads(d["attrs"]["classes"]) == CLASSES
    assert json.loads(d["attrs"]["manifest"])["name"] == "m"
    for key in ("heatmap_method", "heatmap_normalisation", "osteoscan_version", "created_at"):
        assert d["attrs"][key]
    with h5py.File(path) as h5:
        assert h5["heatmaps"].chunks == (1, 16, 16)
        assert h5["heatmaps"].compression == "gzip"
        assert h5["heatmaps"].maxshape[0] is None


def test_hdf5_align_pads_missing_classes_and_members(tmp_path: Path) -> None:
    w = Hdf5ResultsWriter(tmp_path / "r.h5", CLASSES, 3, (8, 8), {})
    p = np.array([[0.3, 0.7]], np.float32)
    probs, member = w.align(["normal", "osteoporosis"], p, p[:, None, :])
    assert probs.shape == (1, 3) and np.isnan(probs[0, 1]) and probs[0, 2] == pytest.approx(0.7)
    assert member.shape == (1, 3, 3) and np.isnan(member[0, 1:]).all()
    w.abort()
    assert not (tmp_path / "r.h5").exists()


def test_heatmap_png_name_is_a_hash(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red in RGB order
    p = write_heatmap_png(tmp_path, "1.2.3.4", rgb)
    assert p.name == heatmap_name("1.2.3.4") and "1.2.3" not in p.name
    back = cv2.imread(str(p), cv2.IMREAD_COLOR)
    assert back[0, 0].tolist() == [0, 0, 255]  # BGR on disk = red
