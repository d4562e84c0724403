"""Tests for covariate parsing, the covariates CSV and lookup by image path."""

from __future__ import annotations

from pathlib import Path

import pytest

from osteoscan.covariates import (
    Covariates,
    CovariateTable,
    CovariateTally,
    parse_age,
    parse_sex,
    write_covariates_csv,
)
from osteoscan.errors import UsageError

KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"
if not KNEE.is_dir():
    KNEE = Path("/work/shared/data/knee-xray")


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("F", "F"),
        ("female", "F"),
        (" Male ", "M"),
        ("m", "M"),
        ("WOMAN", "F"),
        ("O", None),
        ("", None),
        (None, None),
        ("unknown", None),
    ],
)
def test_parse_sex(raw: object, want: str | None) -> None:
    assert parse_sex(raw) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("65", 65.0),
        ("65.0", 65.0),
        (71, 71.0),
        ("065Y", 65.0),
        ("006M", 0.5),
        ("52 years", 52.0),
        ("", None),
        ("nan", None),
        ("-3", None),
        ("200", None),
        ("abc", None),
        (None, None),
        (True, None),
    ],
)
def test_parse_age(raw: object, want: float | None) -> None:
    got = parse_age(raw)
    assert got == pytest.approx(want) if want is not None else got is None


def test_covariates_used_and_override() -> None:
    assert Covariates(60.0, "F").used() == "age,sex"
    assert Covariates(60.0, None).used() == "age"
    assert Covariates(None, "M").used() == "sex"
    assert Covariates().used() == "" and Covariates().is_empty()
    header = Covariates(60.0, "F")
    assert header.override(Covariates(None, "M")) == Covariates(60.0, "M")
    assert header.override(None) == header


def test_csv_roundtrip_and_lookup_levels(tmp_path: Path) -> None:
    csv = write_covariates_csv(
        tmp_path / "cov.csv",
        [("normal/N1.png", 40, "female"), ("OP12", 65.5, "M"), ("scan 3.dcm", None, "F")],
    )
    assert csv.read_text().splitlines()[0] == "path,age,sex"
    table = CovariateTable.from_csv(csv)
    assert len(table) == 3
    root = tmp_path / "data"
    # relative path under the root, trailing parts of an absolute path, name, bare stem
    assert table.lookup(root / "normal" / "N1.png", root) == Covariates(40.0, "F")
    assert table.lookup(Path("/elsewhere/normal/n1.PNG")) == Covariates(40.0, "F")
    assert table.lookup(Path("x/osteopenia/OP12.jpg")) == Covariates(65.5, "M")
    assert table.lookup(Path("op12.dcm")) == Covariates(65.5, "M")
    assert table.lookup(Path("a/Scan 3.dcm")) == Covariates(None, "F")
    assert table.lookup(Path("nobody.png")) is None


def test_ambiguous_stem_is_not_guessed(tmp_path: Path) -> None:
    csv = write_covariates_csv(tmp_path / "c.csv", [("a/N1.png", 30, "F"), ("b/N1.png", 70, "M")])
    table = CovariateTable.from_csv(csv)
    assert table.lookup(Path("a/N1.png")) == Covariates(30.0, "F")
    assert table.lookup(Path("/root/b/N1.png")) == Covariates(70.0, "M")
    assert table.lookup(Path("c/N1.png")) is None  # two rows share name and stem


def test_configurable_columns_bom_and_spaces(tmp_path: Path) -> None:
    csv = tmp_path / "details.csv"
    csv.write_text(
        "\ufeffS.No, Patient Id ,Gender,Age,Name\n1, OP7 ,female,54.0,Jane\n", encoding="utf-8"
    )
    table = CovariateTable.from_csv(csv, path_col="Patient Id", age_col="age", sex_col="GENDER")
    assert table.lookup(Path("osteopenia/OP7.jpg")) == Covariates(54.0, "F")


def test_missing_columns_are_usage_errors(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("file,years\nx,3\n")
    with pytest.raises(UsageError, match="no path column"):
        CovariateTable.from_csv(csv)
    csv.write_text("path,weight\nx,3\n")
    with pytest.raises(UsageError, match="neither age column"):
        CovariateTable.from_csv(csv)
    with pytest.raises(UsageError, match="not found"):
        CovariateTable.from_csv(tmp_path / "absent.csv")


@pytest.mark.skipif(not KNEE.is_dir(), reason="knee-xray data not present")
def test_knee_patient_details_as_is() -> None:
    table = CovariateTable.from_csv(
        KNEE / "patient_details.csv", path_col="Patient Id", age_col="Age", sex_col="Gender"
    )
    images = sorted(KNEE.glob("*/*.jpg"))
    assert len(images) == 190
    found = [table.lookup(p, KNEE) for p in images]
    assert all(c is not None and c.age is not None and c.sex in ("F", "M") for c in found)
    assert table.lookup(KNEE / "osteopenia" / "OP1.jpg", KNEE) == Covariates(65.0, "M")


def test_tally_counts_sources_and_warns_on_unusable_values(tmp_path: Path) -> None:
    from osteoscan.covariates import CovariateTally

    csv_path = tmp_path / "cov.csv"
    csv_path.write_text("path,age,sex\nA1,sixty,F\nA2,-5,M\nA3,250,X\nA4,61,\nA5,,O\nghost,70,F\n")
    tally = CovariateTally.from_csv(csv_path)
    root = tmp_path / "data"
    got = [
        tally.resolve(Covariates(), root / "normal" / "A1.png", root),  # CSV sex only
        tally.resolve(Covariates(50.0, None), root / "normal" / "A2.png", root),  # + CSV sex
        tally.resolve(Covariates(), root / "normal" / "A3.png", root),  # nothing usable
        tally.resolve(Covariates(), root / "normal" / "A4.png", root),  # CSV age
        tally.resolve(Covariates(None, "F"), root / "normal" / "B9.png", root),  # header only
        tally.resolve(Covariates(), root / "normal" / "B8.png", root),  # none
    ]
    assert got[1] == Covariates(50.0, "M") and got[2] == Covariates()
    s = tally.summary()
    assert (s.n_images, s.from_csv, s.from_header, s.none) == (6, 3, 1, 2)
    assert s.unmatched_rows == ("A5", "ghost") and s.images_without_row == ("B9.png", "B8.png")
    # "sixty", -5, 250 and X are reported; the empty cell and sex O ("other") are not errors.
    assert [(k, c) for k, c, _ in s.unusable] == [("A1", "age"), ("A2", "age"), ("A3", "age"),
                                                 ("A3", "sex")]  # fmt: skip
    warnings = s.warnings()
    assert len(warnings) == 2
    assert "4 unusable value(s)" in warnings[1] and "'sixty'" in warnings[1]
    assert "2 of 6 images have no row" in warnings[0]
    assert s.to_dict()["unusable_values"] == 4 and "6 images" in s.line()


def test_tally_warns_when_the_csv_matches_no_image(tmp_path: Path) -> None:
    from osteoscan.covariates import CovariateTally

    csv_path = tmp_path / "cov.csv"
    csv_path.write_text("path,age,sex\nP001,60,F\nP002,70,M\n")
    tally = CovariateTally.from_csv(csv_path)
    for name in ("x1.png", "x2.png"):
        tally.resolve(Covariates(), tmp_path / name, tmp_path)
    s = tally.summary()
    assert s.none == 2 and s.from_csv == 0
    (warning,) = s.warnings()
    assert "none of its 2 rows matches an image" in warning and "'P001'" in warning
    # Without a CSV: header counts only, never a warning.
    plain = CovariateTally()
    plain.resolve(Covariates(70.0, "F"), tmp_path / "a.dcm")
    assert plain.summary().from_header == 1 and plain.summary().warnings() == []


def test_written_keys_are_inert_and_read_back_the_same(tmp_path: Path) -> None:
    path = write_covariates_csv(tmp_path / "c.csv", [("=1+1.jpg", 70.0, "F"), ("-x.png", 60, "M")])
    text = path.read_text()
    assert "'=1+1.jpg" in text and "'-x.png" in text  # a spreadsheet shows them as text
    table = CovariateTable.from_csv(path)
    assert table.lookup(Path("=1+1.jpg")) == Covariates(70.0, "F")
    assert table.lookup(Path("-x.png")) == Covariates(60.0, "M")


def test_warnings_quote_names_and_values_as_inert_text(tmp_path: Path) -> None:
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("path,age,sex\n\x1b[2Ja.png,\x1b[31msixty,F\nb.png,70,F\n")
    tally = CovariateTally.from_csv(csv_path)
    tally.resolve(Covariates(), Path("x\x1b[2J\n.png"))
    text = " ".join(tally.summary().warnings())
    assert text and "\x1b" not in text and "\n" not in text and "\\x1b[2J" in text
