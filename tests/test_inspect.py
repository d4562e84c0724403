"""Tests for `osteoscan.inspect` and the issue-2 acceptance run of `osteoscan inspect`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

import osteoscan.readers
from osteoscan.cli import app
from osteoscan.errors import OutputError
from osteoscan.frames import ImageFrame
from osteoscan.inspect import INSPECT_KEYS, inspect_paths
from osteoscan.preprocess import PreprocessConfig
from osteoscan.testing import synthetic

# --- library, with a stand-in reader (fast, independent of the DICOM readers) ----------------


@pytest.fixture
def fake_reader(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace `read_frames` by a stand-in: DICOM → 2 frames, PNG → 1, 'boom' files raise."""
    calls: list[str] = []

    def read_frames(path, kind=None, **_kw):
        calls.append(str(path))
        if "boom" in str(path):
            raise RuntimeError("reader bug")
        n = 2 if kind == "dicom" else 1
        grad = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
        return [
            ImageFrame(
                path=str(path),
                frame=i,
                kind=kind,
                image=grad,
                image_id=f"1.2.3:{i}",
                body_part="knee",
                body_part_reason="BodyPartExamined=KNEE",
                age=65.0,
                sex="F",
                info={"modality": "DX", "rows": np.uint16(30), "columns": 40, "bits_stored": 12},
            )
            for i in range(n)
        ]

    monkeypatch.setattr(osteoscan.readers, "read_frames", read_frames, raising=False)
    return calls


def _folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    synthetic.write_png(root / "a.png", synthetic.synthetic_knee(32), bits=16)
    synthetic.write_dicom(root / "sub" / "b.dcm", synthetic.synthetic_knee(32))
    (root / "x.dcm").write_text("hello")
    (root / "README.txt").write_text("notes")
    return root


def test_inspect_records_and_exports(tmp_path: Path, fake_reader: list[str]) -> None:
    root = _folder(tmp_path / "in")
    ignored = []
    rows = list(
        inspect_paths(
            [root],
            export_dir=tmp_path / "out",
            cfg=PreprocessConfig(size=24),
            on_ignored=ignored.append,
        )
    )
    assert [(Path(r["path"]).relative_to(root).as_posix(), r["frame"]) for r in rows] == [
        ("a.png", 0),
        ("sub/b.dcm", 0),
        ("sub/b.dcm", 1),
        ("x.dcm", 0),
    ]
    assert all(tuple(r) == INSPECT_KEYS for r in rows)
    json.dumps(rows)  # numpy scalars from the reader's info are converted
    assert rows[0]["rows"] == 30 and type(rows[0]["rows"]) is int
    broken = rows[3]
    assert broken["status"] == "error" and broken["kind"] == "broken"
    assert broken["reason"] == "named .dcm but is not DICOM: starts with text"
    assert broken["export"] is None
    assert str(root / "x.dcm") not in fake_reader  # broken files are never handed to a reader
    assert [f.path.name for f in ignored] == ["README.txt"]
    exports = [Path(r["export"]) for r in rows[:3]]
    assert [p.name for p in exports] == ["a.png_f0.png", "sub__b.dcm_f0.png", "sub__b.dcm_f1.png"]
    for p in exports:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == (24, 24)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_export_names_never_collide(tmp_path: Path, fake_reader: list[str]) -> None:
    a = _folder(tmp_path / "one")
    b = _folder(tmp_path / "two")
    rows = list(inspect_paths([a, b, a / "a.png"], export_dir=tmp_path / "out"))
    names = [Path(r["export"]).name for r in rows if r["export"]]
    assert len(names) == len(set(names)) == 6  # a/a.png given twice is listed once
    again = inspect_paths([a, b], export_dir=tmp_path / "o2")
    again = [Path(r["export"]).name for r in again if r["export"]]
    assert again == names  # deterministic


def test_reader_exception_becomes_error_row(tmp_path: Path, fake_reader: list[str]) -> None:
    path = synthetic.write_png(tmp_path / "boom.png", np.zeros((8, 8), np.float32))
    (row,) = inspect_paths([path])
    assert row["status"] == "error" and "reader bug" in row["reason"]


def test_export_dir_unwritable(tmp_path: Path, fake_reader: list[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError):
        list(inspect_paths([_folder(tmp_path / "in")], export_dir=blocker / "sub"))


# --- acceptance (issue 2 "Done when"), real readers -------------------------------------------

SECRET_NAME = "ZQXSECRET^PATIENT"
SECRET_ID = "ID-7731-ZQX"
PHI = [
    SECRET_NAME,
    "ZQXSECRET",
    SECRET_ID,
    "CompressedSamples",  # pydicom-data RG1/RG3 patient names
    "9RG1",  # ... and patient IDs
    "11RG3",
    "19400305",  # ... and birth dates
    "19790408",
]
RG = [f"RG{n}_{enc}" for n in (1, 3) for enc in ("UNCR", "UNCI", "J2KR", "J2KI")]
KNEE = synthetic.synthetic_knee(256, seed=3)


def _dcm(path: Path, image: np.ndarray, **kw) -> Path:
    kw.setdefault("patient_name", SECRET_NAME)
    kw.setdefault("patient_id", SECRET_ID)
    return synthetic.write_dicom(path, image, **kw)


# (relative path, frames, status, body part, age, sex); age None = not checked to the year
EXPECTED: list[tuple[str, int, str, str | None, float | None, str | None]] = [
    *[(f"rg/{n}.dcm", 1, "ok", "unknown", 64.5 if "RG1" in n else 25.4, "F") for n in RG],
    ("rg/RG3_M2.dcm", 1, "ok", "unknown", 25.4, "F"),
    ("knee16.dcm", 1, "ok", "knee", 65.0, "F"),
    ("knee16.png", 1, "ok", "unknown", None, None),
    ("knee.jpg", 1, "ok", "unknown", None, None),
    ("multi3.dcm", 3, "ok", "knee", 70.0, "M"),
    ("spine/L1.dcm", 1, "ok", "spine", 58.0, "F"),
    ("knee_desc.dcm", 1, "ok", "knee", 44.0, "M"),
    ("PACS/IM000042", 1, "ok", "knee", 65.0, "F"),
    ("broken/empty.dcm", 1, "error", "unknown", None, None),
    ("broken/x.dcm", 1, "error", "unknown", None, None),
    # a truncated file's header may still be readable: its body part is not checked
    ("broken/truncated.dcm", 1, "error", None, None, None),
    ("report.dcm", 1, "skipped", "unknown", None, None),
]


@pytest.fixture(scope="module")
def acceptance(
    tmp_path_factory: pytest.TempPathFactory, pydicom_data: Callable[[str], Path]
) -> tuple[Path, Path, list[dict], str]:
    """Build the issue's folder, run `inspect --json --export` once, return the parsed run."""
    folder = tmp_path_factory.mktemp("acceptance") / "in"
    out = folder.parent / "out"
    (folder / "rg").mkdir(parents=True)
    for name in RG:
        os.symlink(pydicom_data(name), folder / "rg" / f"{name}.dcm")
    synthetic.invert_monochrome(pydicom_data("RG3_UNCR"), folder / "rg" / "RG3_M2.dcm")
    _dcm(folder / "knee16.dcm", KNEE, bits_stored=16)
    synthetic.write_png(folder / "knee16.png", KNEE, bits=16)
    cv2.imwrite(str(folder / "knee.jpg"), np.rint(KNEE * 255).astype(np.uint8))
    frames = np.stack([synthetic.synthetic_knee(64, seed=s) for s in range(3)])
    _dcm(folder / "multi3.dcm", frames, patient_age="070Y", patient_sex="M")
    _dcm(folder / "spine" / "L1.dcm", KNEE, body_part="LUMBAR SPINE", patient_age="058Y")
    _dcm(
        folder / "knee_desc.dcm",
        KNEE,
        body_part=None,
        study_description="XR KNEE LEFT 2 VIEWS",
        patient_age=None,
        patient_birth_date="19800110",
        study_date="20240115",
        patient_sex="M",
    )
    _dcm(folder / "PACS" / "IM000042", KNEE, bits_stored=16, preamble=False)
    (folder / "broken").mkdir()
    (folder / "broken" / "empty.dcm").touch()
    (folder / "broken" / "x.dcm").write_text("This is not a DICOM file.\n")
    whole = _dcm(folder / "whole.tmp", KNEE).read_bytes()
    (folder / "whole.tmp").unlink()
    (folder / "broken" / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    synthetic.write_structured_report(folder / "report.dcm")
    (folder / "README.txt").write_text("not an image")

    result = CliRunner().invoke(app, ["inspect", str(folder), "--json", "--export", str(out)])
    assert result.exception is None, result.output
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return folder, out, rows, result.output


def _by_rel(folder: Path, rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(Path(r["path"]).relative_to(folder).as_posix(), r["frame"]): r for r in rows}


def test_acceptance_one_line_per_frame(acceptance) -> None:
    folder, _out, rows, _ = acceptance
    got = _by_rel(folder, rows)
    want = [(rel, f) for rel, n, *_ in EXPECTED for f in range(n)]
    assert len(rows) == len(want)
    assert sorted(got) == sorted(want)
    for key in ("path", "frame", "status", "reason", "kind", "body_part", "age", "sex", "export"):
        assert all(key in r for r in rows)


def test_acceptance_status_body_part_age_sex(acceptance) -> None:
    folder, _out, rows, _ = acceptance
    got = _by_rel(folder, rows)
    for rel, n, status, part, age, sex in EXPECTED:
        for f in range(n):
            row = got[(rel, f)]
            assert row["status"] == status, (rel, row["reason"])
            if part is not None:
                assert row["body_part"] == part, (rel, row["body_part_reason"])
                assert row["sex"] == sex, rel
            if age is not None:
                assert row["age"] == pytest.approx(age, abs=0.5), rel
            if status == "ok":
                assert row["reason"] == "" and row["export"], rel
            else:
                assert row["reason"], rel  # broken and skipped files say why
                assert row["export"] is None
    assert got[("PACS/IM000042", 0)]["kind"] == "dicom"
    assert got[("knee_desc.dcm", 0)]["body_part_reason"]
    assert got[("spine/L1.dcm", 0)]["body_part_reason"]
    assert got[("broken/empty.dcm", 0)]["reason"] == "empty file (0 bytes)"
    assert got[("broken/x.dcm", 0)]["reason"].startswith("named .dcm but is not DICOM")
    assert got[("multi3.dcm", 2)]["image_id"].endswith(":2")
    assert got[("rg/RG1_J2KR.dcm", 0)]["photometric"] == "MONOCHROME1"
    assert got[("knee16.dcm", 0)]["bits_stored"] == 16


def _export(folder: Path, rows: list[dict], rel: str, frame: int = 0) -> np.ndarray:
    path = _by_rel(folder, rows)[(rel, frame)]["export"]
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint16 and img.shape == (320, 320)
    return img.astype(np.int64)


@pytest.mark.parametrize("n", [1, 3])
def test_acceptance_jpeg2000_lossless_exact_lossy_close(acceptance, n: int) -> None:
    folder, _out, rows, _ = acceptance
    unc = _export(folder, rows, f"rg/RG{n}_UNCR.dcm")
    assert np.array_equal(_export(folder, rows, f"rg/RG{n}_J2KR.dcm"), unc)
    lossy = _export(folder, rows, f"rg/RG{n}_J2KI.dcm")
    assert np.abs(lossy - unc).mean() / 65535 < 0.01  # measured: 0.04 % (RG1), 0.015 % (RG3)
    # UNCI is the vendor's own decompression of the lossy file: ours must match it exactly
    assert np.array_equal(lossy, _export(folder, rows, f"rg/RG{n}_UNCI.dcm"))


def test_acceptance_monochrome1_equals_inverted_monochrome2_bone_bright(
    acceptance, pydicom_data: Callable[[str], Path]
) -> None:
    folder, _out, rows, _ = acceptance
    m1 = _export(folder, rows, "rg/RG3_UNCR.dcm")
    m2 = _export(folder, rows, "rg/RG3_M2.dcm")
    assert np.array_equal(m1, m2)
    # MONOCHROME1 stores bone as *low* values: bone-bright output anti-correlates with them.
    raw = pydicom.dcmread(pydicom_data("RG3_UNCR")).pixel_array.astype(np.float32)
    raw = cv2.resize(raw, (320, 320), interpolation=cv2.INTER_AREA)
    assert np.corrcoef(raw.ravel(), m1.ravel())[0, 1] < -0.8


def test_acceptance_16bit_dicom_equals_png_bone_bright(acceptance) -> None:
    folder, _out, rows, _ = acceptance
    dcm = _export(folder, rows, "knee16.dcm")
    png = _export(folder, rows, "knee16.png")
    assert np.array_equal(dcm, png)
    assert np.corrcoef(cv2.resize(KNEE, (320, 320)).ravel(), dcm.ravel())[0, 1] > 0.95
    # the preamble-less copy of the same image reads the same
    assert np.array_equal(_export(folder, rows, "PACS/IM000042"), dcm)


def test_acceptance_no_patient_identifiers(acceptance) -> None:
    _folder_, out, rows, output = acceptance
    names = " ".join(p.name for p in out.iterdir())
    text = output + json.dumps(rows)
    for secret in PHI:
        assert secret not in text
        assert secret not in names
