"""The scan pipeline as a library: routing, statuses, identical scores, heatmaps, flat memory."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless

from osteoscan.load import Loader
from osteoscan.scan.batch import collate_frames
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.engines.local import ScanDataset
from osteoscan.scan.pipeline import run_scan
from osteoscan.scan.plan import discover_files
from osteoscan.scan.routing import Router
from osteoscan.scan.score import Scorer, load_models
from osteoscan.testing import synthetic


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, pydicom_data: Callable) -> Path:
    """Knee DICOMs (plain + JPEG 2000 lossless), PNG twin, RG3 pair, chest CR, spine, junk."""
    root = tmp_path_factory.mktemp("archive")
    raw = np.round(synthetic.synthetic_knee(96, seed=1) * 65535).astype(np.uint16)
    synthetic.write_dicom(root / "knee_plain.dcm", raw, bits_stored=16)
    synthetic.write_dicom(
        root / "knee_j2k.dcm", raw, bits_stored=16, transfer_syntax=JPEG2000Lossless
    )
    synthetic.write_png(root / "knee_twin.png", raw.astype(np.float64) / 65535.0)
    for i in range(3):
        synthetic.write_png(root / "png" / f"k{i}.png", synthetic.synthetic_knee(80, seed=10 + i))
    rg = root / "rg"
    rg.mkdir()
    shutil.copy(pydicom_data("RG3_UNCR"), rg / "rg3_uncr.dcm")
    shutil.copy(pydicom_data("RG3_J2KR"), rg / "rg3_j2kr.dcm")
    shutil.copy(pydicom_data("RG1_UNCR"), rg / "rg1_chest.dcm")
    synthetic.write_dicom(root / "spine.dcm", synthetic.synthetic_knee(64, seed=3),
                          body_part="LSPINE")  # fmt: skip
    synthetic.write_structured_report(root / "report.dcm")
    (root / "broken.dcm").write_bytes(b"this is not DICOM" * 20)
    (root / "empty.png").write_bytes(b"")
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def scan_result(archive: Path, tiny_package: Callable, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out")
    cfg = ScanConfig(
        paths=[archive], out=out / "results.csv", hdf5=out / "results.h5",
        heatmaps_dir=out / "hm", models=[str(tiny_package())], device="cpu", batch_size=4,
        workers=0, body_part="knee",
    )  # fmt: skip
    events = []
    summary = run_scan(cfg, on_event=events.append)
    return cfg, summary, events, {Path(r["path"]).name: r for r in _rows(out / "results.csv")}


def test_statuses_and_reasons(scan_result) -> None:
    _, summary, _, rows = scan_result
    assert "README.txt" not in rows and len(rows) == 13 == summary.rows
    for name in ("knee_plain.dcm", "knee_j2k.dcm", "knee_twin.png", "k0.png", "rg3_uncr.dcm"):
        assert rows[name]["status"] == "ok", rows[name]["reason"]
        assert rows[name]["body_part"] == "knee" and rows[name]["model"] == "tiny-knee 0.0.1"
    # RG3 is a lower-leg CR: BodyPartExamined=EXTREMITY (unspecific) → --body-part knee applies.
    assert rows["rg1_chest.dcm"]["status"] == "skipped"
    assert "CHEST" in rows["rg1_chest.dcm"]["reason"]
    assert rows["spine.dcm"]["status"] == "skipped" and rows["spine.dcm"]["body_part"] == "spine"
    assert "no spine model installed" in rows["spine.dcm"]["reason"]
    assert rows["report.dcm"]["status"] == "skipped"
    assert rows["broken.dcm"]["status"] == "error" and rows["broken.dcm"]["reason"]
    assert rows["empty.png"]["status"] == "error"
    assert summary.counts["ok"] == 8 and summary.counts["error"] == 2
    assert events_are_monotonic(scan_result[2])


def events_are_monotonic(events) -> bool:
    done = [e.files_done for e in events]
    return events[0].kind == "start" and events[-1].kind == "done" and done == sorted(done)


def test_lossless_re_encodings_score_identically(scan_result) -> None:
    rows = scan_result[3]
    plain = float(rows["knee_plain.dcm"]["score"])
    assert abs(float(rows["knee_j2k.dcm"]["score"]) - plain) < 1e-4
    assert abs(float(rows["knee_twin.png"]["score"]) - plain) < 1e-4
    assert abs(float(rows["rg3_j2kr.dcm"]["score"]) - float(rows["rg3_uncr.dcm"]["score"])) < 1e-4


def test_heatmaps_and_hdf5(scan_result) -> None:
    from osteoscan.writers import read_hdf5

    cfg, _, _, rows = scan_result
    ok = [r for r in rows.values() if r["status"] == "ok"]
    for r in ok:
        probs = [float(r[f"p_{c}"]) for c in ("normal", "osteopenia", "osteoporosis")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert (r["flagged"] == "true") == (float(r["score"]) >= float(r["threshold"]))
        assert bool(r["heatmap"]) == (r["flagged"] == "true")
        if r["heatmap"]:
            assert Path(r["heatmap"]).is_file() and Path(r["heatmap"]).parent == cfg.heatmaps_dir
    d = read_hdf5(cfg.hdf5)
    assert len(d["image_id"]) == len(ok) and d["has_heatmap"].all()
    assert d["heatmaps"].shape == (len(ok), 64, 64)
    assert d["heatmaps"].min() >= 0.0 and d["heatmaps"].max() <= 1.0
    by_id = {r["image_id"]: r for r in ok}
    for i, image_id in enumerate(d["image_id"]):
        assert d["score"][i] == pytest.approx(float(by_id[image_id]["score"]), abs=1e-5)


def test_flagged_heatmaps_only_for_flagged_rows(archive: Path, tiny_package, tmp_path) -> None:
    """Without HDF5, heatmaps run on flagged rows only (second pass); scores are unchanged."""
    cfg = ScanConfig(
        paths=[archive / "png"], out=tmp_path / "r.csv", heatmaps_dir=tmp_path / "hm",
        models=[str(tiny_package())], device="cpu", workers=0, body_part="knee", threshold=0.0,
    )  # fmt: skip
    run_scan(cfg)
    rows = _rows(tmp_path / "r.csv")
    assert len(rows) == 3 and all(r["flagged"] == "true" and r["heatmap"] for r in rows)
    assert len(list((tmp_path / "hm").glob("*.png"))) == 3
    flagged = _rows(tmp_path / "r.flagged.csv")  # the flagged rows, in the results' order
    assert [r["image_id"] for r in flagged] == [r["image_id"] for r in rows]


def test_covariates_from_header_and_csv(archive: Path, tiny_package, tmp_path) -> None:
    (tmp_path / "cov.csv").write_text("file,years,gender\nk0.png,71,F\n")
    cfg = ScanConfig(paths=[archive], out=tmp_path / "r.csv", covariates=tmp_path / "cov.csv",
                     covariate_columns=("file", "years", "gender"))  # fmt: skip
    models = load_models([str(tiny_package())], __import__("torch").device("cpu"))
    ctx = Scorer(cfg, models)
    files, _ = discover_files(cfg)
    ds = ScanDataset(files, Loader(Router([["knee"]], override="knee"), [models[0].preprocess]))
    recs = {Path(r.path).name: r for i in range(len(ds)) for r in ds[i]}
    png = ctx.covariates_for(recs["k0.png"])
    assert (png.age, png.sex) == (71.0, "F")
    assert ctx.covariates_for(recs["k1.png"]) is None
    dcm = ctx.covariates_for(recs["knee_plain.dcm"])  # synthetic header: 065Y, F
    assert (dcm.age, dcm.sex) == (65.0, "F")


def test_memory_flat_across_batches_with_heatmaps(archive: Path, tiny_package, tmp_path) -> None:
    import torch

    cfg = ScanConfig(paths=[archive / "png"], out=tmp_path / "r.csv", hdf5=tmp_path / "r.h5",
                     batch_size=8)  # fmt: skip
    models = load_models([str(tiny_package())], torch.device("cpu"))
    ctx = Scorer(cfg, models)
    assert ctx.heatmaps_same_pass
    files, _ = discover_files(cfg)
    ds = ScanDataset(files, Loader(Router([["knee"]], override="knee"), [models[0].preprocess]))
    batch = collate_frames([ds[i] for i in range(len(ds))] * 3)

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    for _ in range(5):
        ctx.score(batch)
    before = rss()
    for _ in range(40):
        res = ctx.score(batch)
        assert all(item.heatmap is not None for item in res if item.row.status == "ok")
    growth = rss() - before
    assert growth < 8 * 1024**2, f"RSS grew {growth / 1024**2:.1f} MiB over 40 batches"
    for model in models[0].ensemble.models:  # Grad-CAM hooks released every batch
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.gpu
def test_cuda_scan_matches_cpu(archive: Path, tiny_package, tmp_path) -> None:
    """Pinned memory + AMP on CUDA give the CPU scores within AMP tolerance."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    scores = {}
    for dev in ("cpu", "cuda"):
        cfg = ScanConfig(paths=[archive / "png"], out=tmp_path / dev / "r.csv", device=dev,
                         models=[str(tiny_package())], workers=1, body_part="knee")  # fmt: skip
        run_scan(cfg)
        scores[dev] = [float(r["score"]) for r in _rows(tmp_path / dev / "r.csv")]
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], atol=2e-2)
