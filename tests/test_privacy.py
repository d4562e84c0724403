"""No patient identifier in any output, log or state file unless --include-phi asks for IDs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from osteoscan.testing.synthetic import synthetic_knee, write_dicom

NAME = "ZQXWALDORF^PHINEAS"
PATIENT_ID = "PIDZQ7731904"
ACCESSION = "ACCZQ55210"
BIRTH = "19230405"
SECRETS = [NAME, "ZQXWALDORF", "PHINEAS", PATIENT_ID, ACCESSION, BIRTH]


def _archive(root: Path) -> Path:
    arch = root / "archive"
    for i in range(3):
        path = write_dicom(
            arch / f"k{i}.dcm", synthetic_knee(64, seed=i, density=0.3),
            patient_name=NAME, patient_id=PATIENT_ID, patient_birth_date=BIRTH,
        )  # fmt: skip
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = ACCESSION
        ds.OtherPatientIDs = PATIENT_ID
        ds.save_as(path)
    return arch


def _scan(arch: Path, out: Path, pkg: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "osteoscan", "scan", str(arch), "--out", str(out / "results.csv"),
        "--model", str(pkg), "--hdf5", str(out / "results.h5"), "--heatmaps", str(out / "hm"),
        "--heatmaps-for", "all", "--workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip
    import contextlib
    import io

    from osteoscan.cli import main

    # in-process (no interpreter start-up cost); both streams are kept to check the log lines
    out_s, err_s, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out_s), contextlib.redirect_stderr(err_s):
        try:
            main(cmd[3:])
        except SystemExit as exc:
            code = int(exc.code or 0)
    proc = subprocess.CompletedProcess(cmd, code, out_s.getvalue(), err_s.getvalue())
    assert proc.returncode == 0, proc.stderr
    return proc


def _leaks(out: Path, proc: subprocess.CompletedProcess, secrets: list[str]) -> list[str]:
    found = []
    blobs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    for p in out.rglob("*"):
        blobs[f"name:{p.relative_to(out)}"] = p.name.encode()
        if p.is_file():
            blobs[str(p.relative_to(out))] = p.read_bytes()
    for where, data in blobs.items():
        for s in secrets:
            for enc in (s.encode(), s.encode("utf-16-le")):
                if enc in data:
                    found.append(f"{s!r} in {where}")
    return found


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, tiny_package) -> dict:
    root = tmp_path_factory.mktemp("privacy")
    arch = _archive(root)
    pkg = tiny_package(size=32)
    out = root / "out"
    proc = _scan(arch, out, pkg)
    return {"root": root, "arch": arch, "pkg": pkg, "out": out, "proc": proc}


def test_no_identifier_in_any_output_state_or_log(scanned: dict) -> None:
    out = scanned["out"]
    names = {p.name for p in out.iterdir()}
    assert {"results.csv", "results.flagged.csv", "results.h5", "results.state.sqlite"} <= names
    assert list((out / "hm").glob("*.png")), "heatmaps were written"
    assert _leaks(out, scanned["proc"], SECRETS) == []


def test_image_id_is_the_sop_instance_uid(scanned: dict) -> None:
    with open(scanned["out"] / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in scanned["arch"].glob("*.dcm")}
    assert {r["image_id"] for r in rows} == uids
    assert "patient_id" not in rows[0] and "accession_number" not in rows[0]


def test_include_phi_adds_only_ids_and_they_go_again_without_it(scanned: dict) -> None:
    out = scanned["out"]
    proc = _scan(scanned["arch"], out, scanned["pkg"], "--include-phi")
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["patient_id"] for r in rows} == {PATIENT_ID}
    assert {r["accession_number"] for r in rows} == {ACCESSION}
    # names and birth dates never, even when asked for identifiers
    assert _leaks(out, proc, [NAME, "ZQXWALDORF", "PHINEAS", BIRTH]) == []
    # a run without --include-phi rescans (other run key) and leaves no identifier anywhere,
    # including the state database (secure_delete + WAL checkpoint)
    proc = _scan(scanned["arch"], out, scanned["pkg"])
    assert _leaks(out, proc, SECRETS) == []
