"""Hostile names and headers (issue 17): whatever a file name or header says stays inert data.

A corpus of files whose names and headers carry formulas, HTML/JS, ANSI escapes, newlines, very
long strings and invalid UIDs is scanned: every file has its row, every CSV cell is neutralised
and reads back with the csv module's default limits, no log line or event carries a control
character. Planted symlinks at output, state and lock paths are never written through.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from osteoscan.errors import OutputError
from osteoscan.inert import (
    FORMULA_PREFIXES,
    MAX_CELL_CHARS,
    cap,
    csv_cell,
    dicom_value,
    log_safe,
    neutralise,
    uncell,
    unquote,
    valid_uid,
)
from osteoscan.testing.files import write_dicom, write_png
from osteoscan.testing.synthetic import synthetic_knee

HOSTILE = [
    "=1+1", "+SUM(A1:A9)", "-2+3+cmd|' /C calc'!A0", "@SUM(1)", "\tTAB", "\rCR",
    "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "javascript:alert(1)",
    "\x1b[2J\x1b[31mRED", "two\nlines", "\x9b31mC1", "bidi\u202egnp.exe", "L" * 3000,
]  # fmt: skip
MARK = "ZQ"  # ends the hostile header values: told apart from the same strings in file names
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# -- the rules, one by one ----------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["=1+1", "+1+1", "-1+1", "@A1", "\t=1", "\r=1", "-", "+"])
def test_formula_cells_get_a_leading_quote(cell: str) -> None:
    assert neutralise(cell) == "'" + cell
    assert uncell(neutralise(cell)) == cell


@pytest.mark.parametrize("cell", ["-0.5", "+3", "-1e-3", "12", ".5", "", "knee", "a=b", "'=x"])
def test_numbers_and_plain_text_stay_as_they_are(cell: str) -> None:
    assert neutralise(cell) == cell


def test_csv_cell_escapes_caps_and_neutralises() -> None:
    assert csv_cell("=1+1\n\x1b[2J") == "'=1+1\\x0a\\x1b[2J"
    assert csv_cell("\tx") == "\\x09x"  # a tab becomes a visible escape: no formula left
    assert len(csv_cell("=" + "x" * 10_000)) <= MAX_CELL_CHARS + 1
    assert cap("abc", 10) == "abc" and len(cap("a" * 100, 10)) == 10


def test_log_safe_shows_every_control_character_visibly() -> None:
    raw = "a\x1b[2Jb\nc\rd\x00e\x7ff\x9bg\u202eh" + b"\xff".decode("utf-8", "surrogateescape")
    shown = log_safe(raw)
    assert not CONTROL.search(shown)
    assert shown == "a\\x1b[2Jb\\x0ac\\x0dd\\x00e\\x7ff\\x9bg\\u202eh\\xff"
    assert log_safe("knee/Ünïcode ok.dcm") == "knee/Ünïcode ok.dcm"
    shown.encode("utf-8")  # no lone surrogate left: every output can encode it


def test_unquote_drops_quoted_values_of_parser_messages() -> None:
    msg = "invalid literal for int() with base 10: 'DOE^JANE' near b'\\x00PID'"
    assert "DOE" not in unquote(msg) and "PID" not in unquote(msg)


@pytest.mark.parametrize(
    "uid,ok",
    [("1.2.840.10008.5.1.4.1.1.1", True), ("1.2.3", True), ("0.0", True), ("1", False),
     ("1.02.3", False), ("1..2", False), ("1.2.", False), ("=1+1", False), ("1.2a", False),
     ("1." + "2" * 63, False), ("1.2.3\x00", True), ("1.2.3\x1b[2J", False), ("", False)],
)  # fmt: skip
def test_valid_uid(uid: str, ok: bool) -> None:
    assert valid_uid(uid) is ok


@pytest.mark.parametrize(
    "value,vr,want",
    [
        ("KNEE", "CS", "KNEE"), ("L-SPINE", "CS", "L-SPINE"), ("Knee left", "CS", "Knee left"),
        ("THORACOLUMBAR SPINE", "CS", "THORACOLUMBAR SP"), ("=1+1", "CS", ""),
        ("<script>", "CS", ""), ("\x1b[2J", "CS", ""), ("F", "CS", "F"),
        ("XR KNEE 2 VIEWS", "LO", "XR KNEE 2 VIEWS"), ("x" * 80, "LO", "x" * 64),
        ("KNEE\x00\x10\x00\x10\x00PNDOE^JANE", "LO", ""), ("a\\b", "LO", ""),
        ("<script>alert(1)</script>", "LO", "<script>alert(1)</script>"),
        ("two\nlines", "LO", ""), ("two\nlines", "LT", "two\nlines"),
        ("065Y", "AS", "065Y"), ("65", "AS", "65"), ("0650Y", "AS", ""), ("-5Y", "AS", ""),
        ("20240115", "DA", "20240115"), ("2024-01-15", "DA", ""),
        ("1.2.3", "UI", "1.2.3"), ("1.2.3.x", "UI", ""), ("1." + "1" * 70, "UI", ""),
        ("-1.5", "DS", "-1.5"), ("1" * 20, "DS", ""), ("12", "IS", "12"), ("1.5", "IS", ""),
        (b"KNEE", "CS", ""), (None, "CS", ""), (["ORIGINAL", "PRIMARY"], "CS", "ORIGINAL\\PRIMARY"),
        (["ORIGINAL", "\x1b"], "CS", ""), ("KNEE  ", "CS", "KNEE"),
    ],
)  # fmt: skip
def test_dicom_values_are_checked_against_their_vr(value: object, vr: str, want: str) -> None:
    assert dicom_value(value, vr) == want


# -- a hostile corpus, scanned -----------------------------------------------------------------
def _name(text: str, suffix: str) -> str:
    return text.replace("/", "_")[:200] + suffix  # "/" cannot be in a name; 255 bytes at most


def _corpus(root: Path) -> dict[str, Path]:
    """Knee PNGs and DICOMs named after the hostile strings; DICOMs with the strings in
    BodyPartExamined, StudyDescription, PatientSex and SOPInstanceUID."""
    arch = root / "archive"
    img = synthetic_knee(64, seed=5, density=0.3)
    files: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns about these values
        for i, text in enumerate(HOSTILE):
            files[f"png{i}"] = write_png(arch / _name(text, ".png"), img)
            files[f"name{i}"] = write_dicom(arch / "names" / _name(text, ".dcm"), img)
            # the default character set is Latin-1: other characters go in as their UTF-8 bytes
            raw = (text + MARK).encode("utf-8").decode("latin-1")
            files[f"hdr{i}"] = write_dicom(
                arch / "headers" / f"h{i}.dcm", img, body_part=raw, study_description=raw,
                series_description=raw, patient_sex=raw, sop_instance_uid=raw,
            )  # fmt: skip
    return files


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, tiny_package) -> dict:
    from osteoscan.cli.progress import LogReporter
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.pipeline import run_scan

    root = tmp_path_factory.mktemp("hostile")
    files = _corpus(root)
    out = root / "out"
    log = io.StringIO()
    reporter = LogReporter(Console(file=log, width=300, force_terminal=False), log_every=0)
    events: list = []

    def on_event(ev: object) -> None:
        events.append(ev)
        reporter(ev)  # type: ignore[arg-type]

    cfg = ScanConfig(
        paths=[root / "archive"], out=out / "results.csv", hdf5=out / "results.h5",
        heatmaps_dir=out / "hm", heatmaps_for="all", models=[tiny_package(size=32)],
        device="cpu", workers=0, body_part="knee",
    )  # fmt: skip
    summary = run_scan(cfg, on_event)
    reporter.summary(summary)
    return {"root": root, "out": out, "files": files, "log": log.getvalue(), "events": events}


def _rows(path: Path) -> list[dict[str, str]]:
    assert csv.field_size_limit() == 131072  # the csv module's default limit
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_file_has_its_row(scanned: dict) -> None:
    rows = _rows(scanned["out"] / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(csv_cell(p) for p in scanned["files"].values())
    assert all(r["status"] in ("ok", "skipped", "error") for r in rows)


def test_every_csv_cell_is_inert(scanned: dict) -> None:
    for name in ("results.csv", "results.flagged.csv"):
        rows = _rows(scanned["out"] / name)
        for row in rows:
            for col, cell in row.items():
                assert len(cell) <= MAX_CELL_CHARS, (col, len(cell))
                assert not CONTROL.search(cell), (col, cell)
                formula = cell.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(cell)
                assert not formula, (col, cell)
    text = (scanned["out"] / "results.csv").read_text(encoding="utf-8")
    assert "'=1+1.png" not in text  # the path starts with the folder, not with '='
    png = scanned["files"]["png0"]
    assert str(png).startswith("/")  # a relative scan root would make the cell start with '='


def test_a_formula_at_the_start_of_a_cell_is_neutralised(tmp_path: Path) -> None:
    from osteoscan.rows import ResultRow, result_columns

    row = ResultRow(path="=1+1.jpg", frame=0, image_id="@x", status="ok", reason="-2+3",
                    body_part="knee", scanned_at="2026-11-30T10:00:00Z", model="+m",
                    probs={"normal": -0.5}, score=-0.25, covariates="=age")  # fmt: skip
    columns = result_columns(["normal"])
    cells = dict(zip(columns, row.csv_cells(columns), strict=True))
    assert cells["path"] == "'=1+1.jpg" and cells["image_id"] == "'@x"
    assert cells["reason"] == "'-2+3" and cells["model"] == "'+m"
    assert cells["covariates"] == "'=age"
    assert cells["p_normal"] == "-0.500000" and cells["score"] == "-0.250000"  # numbers stay
    assert cells["frame"] == "0"
    back = ResultRow.from_csv_cells(cells)
    assert (back.path, back.image_id, back.reason, back.probs) == ("=1+1.jpg", "@x", "-2+3",
                                                                  {"normal": -0.5})  # fmt: skip


def test_invalid_uids_give_the_content_hash_and_say_so(scanned: dict) -> None:
    rows = {r["path"]: r for r in _rows(scanned["out"] / "results.csv")}
    for i in range(len(HOSTILE)):
        row = rows[csv_cell(scanned["files"][f"hdr{i}"])]
        assert row["image_id"].startswith("sha256:"), row
        # (a skipped row's reason is the gate's or the router's, which replaces the reader's)
        assert row["status"] == "skipped" or "SOPInstanceUID is not a valid UID" in row["reason"]
        row = rows[csv_cell(scanned["files"][f"name{i}"])]
        assert valid_uid(row["image_id"]) and "UID" not in row["reason"]


def test_hostile_header_values_reach_no_output(scanned: dict) -> None:
    """They fail their VR (CS: BodyPartExamined, PatientSex; UI: the UID) and are dropped; only
    LO descriptions may keep text such as "<script>" (valid LO characters), never controls.
    The state and the HDF5 included (they keep raw file names, not raw header values)."""
    blobs = {p.name: p.read_bytes() for p in scanned["out"].rglob("*") if p.is_file()}
    blobs["log"] = scanned["log"].encode()
    for where, data in blobs.items():
        for text in HOSTILE:
            if CONTROL.search(text) or text.startswith(FORMULA_PREFIXES) or len(text) > 64:
                raw = (text + MARK).encode("utf-8")
                assert raw not in data and raw[-66:] not in data, (where, text[:20])
        assert b"=1+1" + MARK.encode() not in data, where  # a formula in a CS: dropped


def test_raw_values_stay_in_the_hdf5(scanned: dict) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(scanned["out"] / "results.h5", "r") as h5:
        paths = {p.decode("utf-8") for p in h5["path"][:]}
    assert str(scanned["files"]["png0"]) in paths  # '=1+1.png', as it is on disk


def test_logs_and_events_carry_no_control_character(scanned: dict) -> None:
    log = scanned["log"]
    assert log and all(not CONTROL.search(line) for line in log.splitlines())
    assert all(not CONTROL.search(ev.message) for ev in scanned["events"])


def test_inspect_lines_are_inert(scanned: dict) -> None:
    import json

    from osteoscan.cli.inspect import json_line, plain_line
    from osteoscan.inspect import inspect_paths

    records = list(inspect_paths([scanned["root"] / "archive"]))
    assert len(records) == len(scanned["files"])
    for rec in records:
        line = plain_line(rec)
        assert not CONTROL.search(line.replace("\t", ""))
        assert all(not c.startswith(FORMULA_PREFIXES) or _NUMBER.fullmatch(c)
                   for c in line.split("\t"))  # fmt: skip
        js = json_line(rec)
        assert not CONTROL.search(js) and json.loads(js)["path"] == rec["path"]


# -- planted symlinks --------------------------------------------------------------------------
def _scan(root: Path, pkg: Path, out: Path) -> object:
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.pipeline import run_scan

    arch = root / "small"
    if not arch.exists():
        write_png(arch / "k.png", synthetic_knee(64, seed=1, density=0.3))
    cfg = ScanConfig(
        paths=[arch], out=out / "results.csv", hdf5=out / "results.h5", heatmaps_dir=out / "hm",
        heatmaps_for="all", models=[pkg], device="cpu", workers=0, body_part="knee",
    )  # fmt: skip
    return run_scan(cfg)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the output folder that a planted link points to; it must stay as is."""
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_text("precious\n")
    return target


def test_symlinks_at_output_paths_are_replaced_not_written_through(
    tmp_path: Path, tiny_package, outside: Path
) -> None:
    from osteoscan.writers import heatmap_name

    out = tmp_path / "out"
    (out / "hm").mkdir(parents=True)
    arch = tmp_path / "small"
    png = write_png(arch / "k.png", synthetic_knee(64, seed=1, density=0.3))
    from osteoscan.hashing import content_image_id

    planted = [out / "results.csv", out / "results.flagged.csv", out / "results.h5",
               out / "hm" / heatmap_name(content_image_id(png))]  # fmt: skip
    for link in planted:
        link.symlink_to(outside)
    _scan(tmp_path, tiny_package(size=32), out)
    assert outside.read_text() == "precious\n"
    assert [p for p in planted if p.is_symlink()] == []
    assert all(p.is_file() and p.stat().st_size > 0 for p in planted)
    assert sorted(p.name for p in outside.parent.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize(
    "name",
    ["results.state.sqlite", "results.state.sqlite-wal", "results.state.sqlite-journal",
     "results.state.sqlite.lock", "results.csv.lock", "results.state.sqlite.inflight"],
)  # fmt: skip
def test_symlinks_at_state_and_lock_paths_are_refused(
    tmp_path: Path, tiny_package, outside: Path, name: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    link = out / name
    link.symlink_to(outside.parent if name.endswith(".inflight") else outside)
    with pytest.raises(OutputError, match="symbolic link"):
        _scan(tmp_path, tiny_package(size=32), out)
    assert outside.read_text() == "precious\n"
    assert sorted(p.name for p in outside.parent.iterdir()) == ["precious.txt"]
    assert link.is_symlink()  # refused, left for a person to look at


# -- names that are not UTF-8 ------------------------------------------------------------------
_NON_UTF8 = """
import os, sys
from pathlib import Path
from osteoscan.scan.config import ScanConfig
from osteoscan.scan.pipeline import run_scan
from osteoscan.testing.files import write_dicom, write_png
from osteoscan.testing.synthetic import synthetic_knee
root = Path(sys.argv[1])
img = synthetic_knee(64, seed=2)
for made in (write_png(root / "a/x.png", img), write_dicom(root / "a/y.dcm", img)):
    new = os.path.join(os.fsencode(made.parent), b"caf\\xe9\\x1b[2J" + made.suffix.encode())
    os.rename(os.fsencode(made), new)
cfg = ScanConfig(paths=[root / "a"], out=root / "out/results.csv", models=[sys.argv[2]],
                 device="cpu", workers=0, body_part="knee", hdf5=root / "out/results.h5")
run_scan(cfg)
print("second night rows:", run_scan(cfg).rows)  # the names are remembered, not rescanned
print(open(root / "out/results.csv", encoding="utf-8").read())
"""


def test_names_that_are_not_utf8_are_scanned(tmp_path: Path, tiny_package) -> None:
    """In a child process (OpenCV once crashed on such a path): both files get their rows, shown
    with visible escapes, and a second night finds them unchanged."""
    proc = subprocess.run(
        [sys.executable, "-c", _NON_UTF8, str(tmp_path), str(tiny_package(size=32))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("caf\\xe9\\x1b[2J") == 2
    assert "second night rows: 0" in proc.stdout


def test_the_terminal_summary_shows_names_as_text() -> None:
    """Rich markup and escapes in a warning (a file name from the covariates CSV) stay text."""
    from osteoscan.cli.progress import RichReporter
    from osteoscan.scan.config import ScanSummary

    buf = io.StringIO()
    reporter = RichReporter(Console(file=buf, width=200, force_terminal=True, color_system=None))
    summary = ScanSummary(
        n_files=1, n_ignored=0, rows=1, counts={"ok": 1}, elapsed_s=1.0, images_per_s=1.0,
        out=Path("[bold]out\x1b[2J.csv"), flagged_out=Path("f.csv"), hdf5=None, heatmaps_dir=None,
        models=["m"], device="cpu", workers=0, batch_size=1,
        warnings=["c.csv: 1 of 1 images have no row (e.g. [red]x[/red]\x1b[2J.png)"],
    )  # fmt: skip
    reporter.summary(summary)
    text = buf.getvalue()
    assert "[red]x[/red]\\x1b[2J.png" in text and "[bold]out\\x1b[2J.csv" in text
    assert "\x1b[2J" not in text
