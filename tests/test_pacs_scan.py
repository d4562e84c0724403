"""Scanning a real Orthanc over DICOMweb: same scores as a folder, no chest retrieved, incremental
nights, and the failure rules (unreachable, wrong password, 500 and timeout on one instance)."""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from orthanc import USER, Orthanc, RecordingProxy, free_port, run_orthanc, run_proxy, write_netrc
from pydicom.uid import generate_uid

from osteoscan.errors import UsageError
from osteoscan.pacs.client import AuthFailed, PacsUnreachable
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.pipeline import run_scan

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo" / "dicom"
KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"
TODAY = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """This module's Orthanc (tests/orthanc.py)."""
    yield from run_orthanc(tmp_path_factory)


@pytest.fixture()
def orthanc_proxy(orthanc: Orthanc) -> Iterator[RecordingProxy]:
    """A request-logging proxy in front of it, fresh for each test."""
    yield from run_proxy(orthanc)


@pytest.fixture()
def netrc_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test user's ~/.netrc (through NETRC)."""
    return write_netrc(tmp_path, monkeypatch)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _scan(source: str | Path, out: Path, package: Path, **kw: object):  # type: ignore[no-untyped-def]
    cfg = ScanConfig(paths=[str(source)], out=out, models=[package], device="cpu", workers=0,
                     quiet=True, **kw)  # type: ignore[arg-type]  # fmt: skip
    return run_scan(cfg)


def _archive(folder: Path) -> Path:
    """The demo DICOMs (not the truncated copy) and, when ../shared has them, two real knee
    radiographs wrapped as DICOM, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(DEMO.glob("*.dcm")):
        if not f.name.startswith("truncated"):
            shutil.copy(f, folder / f.name)
    if KNEE.is_dir():
        import cv2

        from osteoscan.testing.files import write_dicom

        for i, jpg in enumerate(sorted(KNEE.glob("*/*.jpg"))[:2]):
            image = cv2.imread(str(jpg), cv2.IMREAD_GRAYSCALE).astype("float32") / 255.0
            write_dicom(folder / f"real_{i}.dcm", image, body_part="KNEE", bits_stored=8,
                        patient_age="063Y", patient_sex="F", patient_id=f"REAL-{i}")  # fmt: skip
    return folder


def _new_instance(template: Path, folder: Path) -> Path:
    """A copy of ``template`` as a new instance of a new study dated today."""
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = TODAY
    out = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(out)
    return out


def test_dicomweb_scan_matches_folder_scan_and_is_incremental(
    orthanc, orthanc_proxy: RecordingProxy, netrc_file: Path, tiny_package, tmp_path: Path
) -> None:
    orthanc.clear()
    archive = _archive(tmp_path / "archive")
    files = sorted(archive.glob("*.dcm"))
    assert len(orthanc.upload(files)) == len(files)
    pkg = tiny_package()

    web = _scan(orthanc_proxy.dicomweb, tmp_path / "web.csv", pkg)
    local = _scan(archive, tmp_path / "local.csv", pkg, dicom_out=tmp_path / "local-dicom")
    by_id = {r["image_id"]: r for r in _rows(tmp_path / "local.csv")}
    rows = _rows(tmp_path / "web.csv")
    assert all(r["path"].startswith("dicomweb:") for r in rows)
    scored = [r for r in rows if r["status"] == "ok"]
    assert len(scored) == 8 + (2 if KNEE.is_dir() else 0)  # every knee, demo and real
    for r in rows:  # same rows, same scores as the same files read from a folder
        twin = by_id[r["image_id"]]
        assert (r["status"], r["body_part"], r["flagged"]) == (
            twin["status"], twin["body_part"], twin["flagged"]
        )  # fmt: skip
        if r["status"] == "ok":
            assert float(r["score"]) == pytest.approx(float(twin["score"]), abs=1e-6)
    assert web.counts["ok"] == local.counts["ok"]
    # a folder scan of DICOM files makes the same SRs (one per scored image) with --dicom-out
    srs = [f for f in (tmp_path / "local-dicom").rglob("*.dcm")
           if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"]  # fmt: skip
    assert len(srs) == len(scored)

    # chest and spine were decided from the search attributes: rows, but never retrieved
    skipped = {r["image_id"]: r for r in rows if r["status"] == "skipped"}
    chest = pydicom.dcmread(DEMO / "chest_001.dcm", stop_before_pixels=True).SOPInstanceUID
    assert "not retrieved" in skipped[chest]["reason"]
    retrieved = orthanc_proxy.retrievals()
    assert len(retrieved) == len(scored)
    assert not any(uid in p for p in retrieved for uid in skipped)

    # a second run, even over all dates, retrieves nothing and changes nothing; it removes the
    # retrieved copies a killed run left (they hold identifiers)
    cache = tmp_path / "web.state.sqlite.dicomweb-cache"
    assert not cache.exists()
    (cache / "1.2" / "3.4").mkdir(parents=True)
    shutil.copy(files[0], cache / "1.2" / "3.4" / "5.6.dcm")
    orthanc_proxy.requests.clear()
    again = _scan(orthanc_proxy.dicomweb, tmp_path / "web.csv", pkg, since="2000-01-01")
    assert orthanc_proxy.retrievals() == [] and not cache.exists()
    assert again.counts["ok"] == 0 and again.counts["unchanged"] == len(rows)

    # k new instances (today's studies): the default window finds them, exactly k retrieved
    new = [_new_instance(DEMO / f"knee_00{i}.dcm", tmp_path) for i in (1, 2, 3)]
    orthanc.upload(new)
    orthanc_proxy.requests.clear()
    night = _scan(orthanc_proxy.dicomweb, tmp_path / "web.csv", pkg)
    assert len(orthanc_proxy.retrievals()) == 3 and night.counts["ok"] == 3
    assert len(_rows(tmp_path / "web.csv")) == len(rows) + 3


def test_server_down_wrong_password_and_no_credentials_in_outputs(
    orthanc, netrc_file: Path, tiny_package, tmp_path: Path
) -> None:
    pkg = tiny_package()
    down = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsUnreachable) as err:
        _scan(down, tmp_path / "a.csv", pkg, dicomweb_attempts=1)
    assert down in str(err.value) and err.value.exit_code == 1

    netrc_file.write_text(f"machine 127.0.0.1 login {USER} password wrong-pw-123\n")
    with pytest.raises(AuthFailed, match="authentication failed") as err:
        _scan(orthanc.dicomweb, tmp_path / "b.csv", pkg)
    assert "wrong-pw-123" not in str(err.value) and err.value.exit_code == 1

    # the command line: exit 1, a message naming the URL, no secret anywhere
    env = dict(os.environ, NETRC=str(netrc_file))
    cmd = [sys.executable, "-m", "osteoscan", "scan", orthanc.dicomweb, "-o",
           str(tmp_path / "c.csv"), "--model", str(pkg), "--device", "cpu", "-q"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "authentication failed" in done.stderr and orthanc.dicomweb in done.stderr
    assert "wrong-pw-123" not in done.stdout + done.stderr

    # credentials in the URL are refused before anything is sent
    bad = orthanc.dicomweb.replace("127.0.0.1", f"{USER}:secret@127.0.0.1")
    with pytest.raises(UsageError, match="netrc") as usage:
        ScanConfig(paths=[bad], out=tmp_path / "d.csv").validate()
    assert "secret" not in str(usage.value)


@pytest.mark.parametrize("failure", ["500", "timeout", "404"])
def test_one_failing_instance_is_an_error_row_retried_next_run(
    failure: str,
    orthanc,
    orthanc_proxy: RecordingProxy,
    netrc_file: Path,
    tiny_package,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from orthanc import PASSWORD

    caplog.set_level("DEBUG")
    orthanc.clear()
    files = [_new_instance(DEMO / f"knee_00{i}.dcm", tmp_path) for i in (1, 3)]
    orthanc.upload(files)
    victim = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    proxy = orthanc_proxy
    {"500": proxy.fail, "404": proxy.gone, "timeout": proxy.hang}[failure].add(victim)
    pkg, out = tiny_package(), tmp_path / "r.csv"
    kw = {"dicomweb_attempts": 2, "dicomweb_backoff_s": 0.05, "dicomweb_timeout_s": 1.0}
    first = _scan(orthanc_proxy.dicomweb, out, pkg, **kw)
    assert first.counts["ok"] == 1 and first.counts["error"] == 1
    row = next(r for r in _rows(out) if r["image_id"] == "" or r["status"] == "error")
    assert row["status"] == "error" and victim in row["path"]
    if failure == "404":  # deleted between search and retrieval: not retried forever
        assert "HTTP 404" in row["reason"] and "not on the server any more" in row["reason"]
    else:
        assert ("HTTP 500" if failure == "500" else "timeout") in row["reason"]
        assert "after 2 attempts" in row["reason"] and "retried next run" in row["reason"]

    for subs in (proxy.fail, proxy.gone, proxy.hang, proxy.requests):
        subs.clear()
    second = _scan(proxy.dicomweb, out, pkg, **kw)
    if failure == "404":
        assert second.counts["ok"] == 0 and proxy.retrievals() == []
        return
    assert second.counts["ok"] == 1 and len(proxy.retrievals()) == 1
    assert {r["status"] for r in _rows(out)} == {"ok"}
    for f in tmp_path.rglob("*"):  # CSV, state, logs: never the password
        if f.is_file() and f != netrc_file:
            assert PASSWORD.encode() not in f.read_bytes(), f
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err + caplog.text


def test_a_bearer_token_from_the_environment(
    orthanc, orthanc_proxy: RecordingProxy, tiny_package, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    orthanc.clear()
    orthanc.upload([_new_instance(DEMO / "knee_002.dcm", tmp_path)])
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    orthanc_proxy.bearer = "tok-8f3a-secret"
    monkeypatch.setenv("OSTEOSCAN_DICOMWEB_TOKEN", "tok-8f3a-secret")
    done = _scan(orthanc_proxy.dicomweb, tmp_path / "t.csv", tiny_package())
    assert done.counts["ok"] == 1
    monkeypatch.setenv("OSTEOSCAN_DICOMWEB_TOKEN", "tok-expired")
    with pytest.raises(AuthFailed, match="OSTEOSCAN_DICOMWEB_TOKEN") as err:
        _scan(orthanc_proxy.dicomweb, tmp_path / "u.csv", tiny_package())
    text = str(err.value) + capsys.readouterr().err
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.suffix != ".dcm":
            text += f.read_bytes().decode("latin-1")
    assert "tok-8f3a" not in text and "tok-expired" not in text
