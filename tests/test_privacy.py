"""No patient identifier in any output, log or state file unless --include-phi asks for IDs."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
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


# -- a fuzzed archive: >= 1,000 mutated DICOMs carrying a planted name and ID (issue 17) ------
FUZZ_SEED = 17


def _fuzz_bases(folder: Path) -> list[bytes]:
    """DICOMs that carry the planted name, ID and birth date: explicit VR, implicit VR (no
    preamble), multi-frame."""
    from osteoscan.testing.synthetic import synthetic_knee

    img = synthetic_knee(48, seed=3, density=0.3)
    kw = {"patient_name": NAME, "patient_id": PATIENT_ID, "patient_birth_date": BIRTH,
          "study_description": "KNEE AP", "body_part": "KNEE"}  # fmt: skip
    paths = [
        write_dicom(folder / "b0.dcm", img, **kw),
        write_dicom(folder / "b1.dcm", img, preamble=False, **kw),
        write_dicom(folder / "b2.dcm", np.stack([img, img[::-1]]), **kw),
    ]
    out = [p.read_bytes() for p in paths]
    for p in paths:
        p.unlink()
    return out


def _element(data: bytes, tag: bytes) -> tuple[int, int, int] | None:
    """(offset of the length field, its size, offset of the value) of the first element with
    ``tag`` (group, element little-endian), explicit VR with a 2-byte length or implicit VR."""
    i = data.find(tag)
    if i < 0:
        return None
    vr = data[i + 4 : i + 6]
    if vr.isalpha() and vr.isupper() and vr not in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        return i + 6, 2, i + 8
    return i + 4, 4, i + 8


def swallow(data: bytes, tag: bytes, rng: random.Random) -> bytes:
    """Corrupt the length of element ``tag`` so its value swallows the elements after it, up to
    and past the patient's ID: the leak of issue 17 (the UID became raw header bytes)."""
    found, pid = _element(data, tag), data.find(PATIENT_ID.encode())
    if found is None or pid < 0 or pid < found[2]:
        return data
    at, size, start = found
    length = pid + len(PATIENT_ID) - start + rng.choice([0, 1, 2, 8, 40])
    length = min(length, 0xFFFF if size == 2 else length)
    return data[:at] + length.to_bytes(size, "little") + data[at + size :]


_TAGS = [b"\x08\x00\x18\x00", b"\x08\x00\x30\x10", b"\x18\x00\x15\x00", b"\x10\x00\x40\x00",
         b"\x08\x00\x60\x00", b"\x10\x00\x10\x00"]  # fmt: skip  # UID, study desc., body part…


def fuzz(data: bytes, rng: random.Random) -> bytes:
    """One byte-wise mutation, as a fuzzer makes them (several ops may stack)."""
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2])):
        op = rng.choice(["swallow", "swallow", "length", "flip", "overwrite", "truncate", "dup"])
        if op == "swallow":
            buf = bytearray(swallow(bytes(buf), rng.choice(_TAGS[:3]), rng))
        elif op == "length":
            found = _element(bytes(buf), rng.choice(_TAGS))
            if found:
                at, size, _ = found
                value = rng.choice([0, 1, 3, 255, 0xFFFF, rng.randrange(1 << (8 * size))])
                buf[at : at + size] = value.to_bytes(size, "little")
        elif op == "flip":
            for _ in range(rng.randint(1, 16)):
                j = rng.randrange(len(buf))
                buf[j] ^= 1 << rng.randrange(8)
        elif op == "overwrite":
            j, n = rng.randrange(len(buf)), rng.randint(1, 32)
            buf[j : j + n] = bytes([rng.choice([0x00, 0xFF, 0x20, 0x2E])]) * n
        elif op == "truncate":
            buf = buf[: rng.randrange(len(buf) // 2, len(buf))]
        else:
            j = rng.randrange(len(buf))
            buf = buf[:j] + buf[j:] * 2
    return bytes(buf)


def _fuzzed_archive(root: Path, n: int) -> Path:
    arch = root / "fuzzed"
    arch.mkdir()
    rng = random.Random(FUZZ_SEED)
    bases = _fuzz_bases(root)
    for k in range(n):
        (arch / f"m{k:04d}.dcm").write_bytes(fuzz(rng.choice(bases), rng))
    return arch


def _raw_uid(path: Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom rightly complains about these UIDs
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            return str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - an unreadable mutant has no UID
        return ""


def _fuzz_and_check(root: Path, pkg: Path, n: int) -> None:
    arch = _fuzzed_archive(root, n)
    # the corpus holds the attack: UIDs that, read as they are, carry the patient's ID
    assert any(PATIENT_ID in _raw_uid(p) for p in arch.iterdir())
    out = root / "out"
    proc = _scan(arch, out, pkg, "--quiet")
    assert _leaks(out, proc, SECRETS) == []
    for name in ("results.csv", "results.flagged.csv"):
        with open(out / name, newline="", encoding="utf-8") as fh:  # default field size limit
            rows = list(csv.DictReader(fh))
        assert all(len(v or "") <= 4096 for r in rows for v in r.values())
        if name == "results.csv":
            assert {r["path"] for r in rows} == {str(p) for p in arch.iterdir()}
            # the known leak: a swallowing SOPInstanceUID is not a UID, so the content hash is used
            bad = [r for r in rows if "SOPInstanceUID is not a valid UID" in r["reason"]]
            assert bad and all(r["image_id"].startswith("sha256:") for r in bad)


def test_fuzzed_dicoms_leak_no_identifier(tmp_path: Path, tiny_package) -> None:
    """~100 fuzzed copies (the nightly suite runs 1,000): no name or ID anywhere."""
    _fuzz_and_check(tmp_path, tiny_package(size=32), 100)


@pytest.mark.slow
def test_thousand_fuzzed_dicoms_leak_no_identifier(tmp_path: Path, tiny_package) -> None:
    """Issue 17's acceptance: >= 1,000 fuzzed copies, nothing leaks, every output reads back."""
    _fuzz_and_check(tmp_path, tiny_package(size=32), 1000)
