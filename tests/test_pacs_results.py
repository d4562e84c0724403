"""DICOM results sent to a real Orthanc: one SR per scored instance and one KOS per study with
flagged images, inside the source studies; dsrdump parses each SR; a failed STOW is retried next
run; hostile header values never make an invalid SR."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc import Orthanc, RecordingProxy, run_orthanc, run_proxy, write_netrc
from pydicom.uid import generate_uid

from osteoscan.pacs.results import RESEARCH_USE, evidence_of, heatmap_capture, screening_sr
from osteoscan.rows import ResultRow
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.pipeline import run_scan
from osteoscan.testing.files import write_dicom

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo" / "dicom"
DSRDUMP = shutil.which("dsrdump")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """This module's Orthanc (tests/orthanc.py)."""
    yield from run_orthanc(tmp_path_factory)


@pytest.fixture()
def netrc_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test user's ~/.netrc (through NETRC)."""
    return write_netrc(tmp_path, monkeypatch)


@pytest.fixture()
def proxy(orthanc: Orthanc) -> Iterator[RecordingProxy]:
    """A proxy in front of Orthanc that can answer 500."""
    yield from run_proxy(orthanc)


def _dsrdump_ok(path: Path) -> None:
    if DSRDUMP is None:
        pytest.skip("dcmtk's dsrdump not installed (apt-get install dcmtk)")
    done = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "E:" not in done.stderr, done.stderr


def _objects(orthanc: Orthanc) -> dict[str, list[pydicom.Dataset]]:
    """Every instance in Orthanc, read back, by StudyInstanceUID."""
    import requests
    from orthanc import PASSWORD, USER

    out: dict[str, list[pydicom.Dataset]] = {}
    for oid in orthanc.rest("/instances"):  # type: ignore[union-attr]
        r = requests.get(f"{orthanc.url}/instances/{oid}/file", auth=(USER, PASSWORD), timeout=30)
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(r.content))
        out.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return out


def _upload_demo(orthanc: Orthanc, folder: Path) -> None:
    """The demo DICOMs plus a second image in knee_001's study (a KOS then lists two)."""
    orthanc.clear()
    files = [f for f in sorted(DEMO.glob("*.dcm")) if not f.name.startswith("truncated")]
    ds = pydicom.dcmread(DEMO / "knee_001.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "knee_001_b.dcm")
    assert len(orthanc.upload([*files, folder / "knee_001_b.dcm"])) == len(files) + 1


def test_send_puts_one_sr_per_scored_image_and_one_kos_per_flagged_study(
    orthanc: Orthanc, netrc_file: Path, tiny_package, tmp_path: Path
) -> None:
    _upload_demo(orthanc, tmp_path)
    out = tmp_path / "r.csv"
    cfg = ScanConfig(paths=[orthanc.dicomweb], out=out, models=[tiny_package()], device="cpu",
                     workers=0, quiet=True, threshold=0.0, send=orthanc.dicomweb,
                     dicom_out=tmp_path / "dicom", dicom_heatmaps=True)  # fmt: skip
    summary = run_scan(cfg)
    assert summary.warnings == []
    assert summary.dicom_results.startswith("DICOM results: 9 SR, 8 KOS, 9 heatmap captures")
    assert "26 stored at" in summary.dicom_results and "0 waiting" in summary.dicom_results
    with out.open(newline="") as fh:
        rows = {r["image_id"]: r for r in csv.DictReader(fh)}
    scored = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert len(scored) == 9 and all(r["flagged"] == "true" for r in scored.values())

    by_study = _objects(orthanc)
    n_sr = n_kos = 0
    for objects in by_study.values():
        sources = {
            str(d.SOPInstanceUID): d for d in objects if d.get("Manufacturer") != "osteoscan"
        }
        flagged = [u for u in sources if u in scored]
        srs = [d for d in objects if d.Modality == "SR" and d.get("Manufacturer") == "osteoscan"]
        kos = [d for d in objects if d.Modality == "KO"]
        caps = [d for d in objects if d.Modality == "OT" and d.get("Manufacturer") == "osteoscan"]
        assert len(srs) == len(flagged) and len(caps) == len(flagged)
        assert len(kos) == (1 if flagged else 0)
        for sr in srs:  # inside the source study, with its patient, and saying what it is
            ref = sr.ContentSequence[-1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            src = sources[str(ref)]
            assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
            assert sr.VerificationFlag == "UNVERIFIED" and sr.SOPInstanceUID not in sources
            texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
            nums = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0]
                                                                   .NumericValue)
                    for i in sr.ContentSequence if i.ValueType == "NUM"}  # fmt: skip
            assert RESEARCH_USE in texts and "flagged" in texts
            assert nums["score"] == pytest.approx(float(scored[str(ref)]["score"]), abs=1e-6)
            assert {"p-normal", "p-osteopenia", "p-osteoporosis", "threshold"} <= set(nums)
        for k in kos:
            listed = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                      for i in k.ContentSequence if i.ValueType == "IMAGE"}  # fmt: skip
            assert listed == set(flagged)
        for cap in caps:
            assert cap.BurnedInAnnotation == "YES" and cap.SOPInstanceUID not in sources
        n_sr, n_kos = n_sr + len(srs), n_kos + len(kos)
    assert (n_sr, n_kos) == (9, 8)  # knee_001's study holds two flagged images, one KOS

    written = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert len(written) == 9 + 8 + 9  # the same objects in --dicom-out
    for f in written:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.Modality in ("SR", "KO"):
            _dsrdump_ok(f)

    # results are never scanned as inputs: a rescan over all dates finds nothing new
    again = run_scan(ScanConfig(paths=[orthanc.dicomweb], out=out, models=[tiny_package()],
                                device="cpu", workers=0, quiet=True, threshold=0.0,
                                since="2000-01-01"))  # fmt: skip
    assert again.counts["ok"] == 0 and again.counts["unchanged"] == len(rows)


def _ours(orthanc: Orthanc, modality: str) -> list[pydicom.Dataset]:
    return [d for objs in _objects(orthanc).values() for d in objs
            if d.Modality == modality and d.get("Manufacturer") == "osteoscan"]  # fmt: skip


def test_a_failed_store_is_retried_by_the_next_run(
    orthanc: Orthanc, proxy: RecordingProxy, netrc_file: Path, tiny_package, tmp_path: Path
) -> None:
    _upload_demo(orthanc, tmp_path)
    out = tmp_path / "r.csv"
    proxy.fail.add("/dicom-web/studies")  # STOW-RS answers 500
    kw = dict(paths=[orthanc.dicomweb], out=out, models=[tiny_package()], device="cpu",
              workers=0, quiet=True, send=proxy.dicomweb, dicomweb_attempts=1)  # fmt: skip
    first = run_scan(ScanConfig(**kw, modalities=["DX"]))  # type: ignore[arg-type]
    assert len(first.warnings) == 1 and "HTTP 500" in first.warnings[0], first.warnings
    assert "stored by the next run" in first.warnings[0]
    assert _ours(orthanc, "SR") == []

    proxy.fail.clear()
    second = run_scan(ScanConfig(**kw, modalities=["DX"]))  # type: ignore[arg-type]
    assert second.counts["ok"] == 0 and second.warnings == [], (second.counts, second.warnings)
    srs = _ours(orthanc, "SR")
    assert len(srs) == first.counts["ok"] == 9, (len(srs), first.counts, second.dicom_results)
    state = sqlite3.connect(tmp_path / "r.state.sqlite")
    memo = json.loads(
        state.execute("SELECT value FROM meta WHERE key='dicom_results'").fetchone()[0]
    )
    assert memo["pending"] == 0 and memo["sent"] >= 9, memo


def test_hostile_header_values_never_make_an_invalid_sr(tmp_path: Path) -> None:
    src = write_dicom(tmp_path / "src.dcm", np.full((32, 32), 0.5, np.float32),
                      patient_name="A" * 300 + "\x1b[31m^B", patient_id="ID\\WITH\\" + "9" * 90,
                      study_date="not-a-date")  # fmt: skip
    ds = pydicom.dcmread(src)
    ds.StudyID = "S" * 40
    ds.AccessionNumber = "\x00\x07ACC"
    ds.PatientSex = "FEMALE-ISH"
    ev = evidence_of(ds)
    assert ev is not None
    row = ResultRow(path="p", frame=0, image_id="x", status="ok", reason="", body_part="knee",
                    scanned_at="t", model="m 1", probs={"normal": 0.2, "osteoporosis": 0.8},
                    prediction="osteoporosis", score=0.8, threshold=0.5, flagged=True,
                    uncertainty=0.1, covariates="age,sex\x1b\u202e" + "z" * 20000)  # fmt: skip
    sr = screening_sr(ev, row, {"name": "m" * 500, "version": "1", "sha": "ab"})
    sr.save_as(tmp_path / "sr.dcm")
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    for keyword, limit in (("PatientID", 64), ("StudyID", 16), ("AccessionNumber", 16)):
        assert len(str(back.get(keyword, ""))) <= limit
    assert back.PatientName == back.PatientID == back.PatientSex == back.StudyDate == ""
    assert all("\x1b" not in str(i.get("TextValue", "")) for i in back.ContentSequence)
    _dsrdump_ok(tmp_path / "sr.dcm")

    ds.SOPInstanceUID = "1.2.3.04\x00junk"  # an invalid UID: nothing can reference it
    assert evidence_of(ds) is None

    cap = heatmap_capture(ev, np.zeros((40, 60, 3), np.uint8), orientation=["A", "F"])
    assert cap.BurnedInAnnotation == "YES" and list(cap.PatientOrientation) == ["A", "F"]
    assert cap.pixel_array[:8].max() > 100  # the burned-in text on its black band
