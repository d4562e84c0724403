"""Header facts: body part (with reason), age and sex from DICOM attributes."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from osteoscan import header

# Real archives hold values that break VR rules ("L-SPINE" in a CS, lower case); pydicom warns.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ds(**attrs: str) -> Dataset:
    d = Dataset()
    for key, value in attrs.items():
        setattr(d, key, value)
    return d


@pytest.mark.parametrize("text,part", [
    ("KNEE", "knee"), ("KNEE LEFT", "knee"), ("Knee_Right", "knee"), ("knie links", "knee"),
    ("PATELLA", "knee"), ("XR KNEE 2 VIEWS", "knee"), ("tibial plateau", "knee"),
    ("LSPINE", "spine"), ("L-SPINE", "spine"), ("LUMBAR SPINE", "spine"), ("L SPINE", "spine"),
    ("CSPINE", "spine"), ("TSPINE", "spine"), ("Thoracic spine AP", "spine"),
    ("LWS 2 Ebenen", "spine"), ("SPINE", "spine"), ("Lumbosacral", "spine"),
    ("CHEST", "unknown"), ("HAND", "unknown"), ("", "unknown"), (None, "unknown"),
    ("KNEEL", "unknown"), ("BACKSPINEX", "unknown"), ("LEG", "unknown"),
])  # fmt: skip
def test_body_part_from_text(text: str | None, part: str) -> None:
    assert header.body_part_from_text(text) == part


def test_body_part_header_wins_and_keeps_reason() -> None:
    assert header.body_part(ds(BodyPartExamined="KNEE LEFT")) == (
        "knee",
        "BodyPartExamined='KNEE LEFT'",
    )
    part, reason = header.body_part(ds(BodyPartExamined="L-SPINE", StudyDescription="KNEE"))
    assert part == "spine" and "L-SPINE" in reason


def test_specific_other_part_is_final() -> None:
    part, reason = header.body_part(ds(BodyPartExamined="CHEST", StudyDescription="knee"))
    assert part == "unknown" and "CHEST" in reason and "neither" in reason


def test_descriptions_used_when_body_part_missing_or_unspecific() -> None:
    assert header.body_part(ds(StudyDescription="XR KNEE BILAT")) == (
        "knee",
        "StudyDescription='XR KNEE BILAT'",
    )
    part, reason = header.body_part(
        ds(BodyPartExamined="EXTREMITY", SeriesDescription="AP", ProtocolName="Lumbar spine 2v")
    )
    assert part == "spine" and reason.startswith("ProtocolName=")
    part, reason = header.body_part(ds(BodyPartExamined="LEG", StudyDescription="distal tibia"))
    assert part == "unknown" and "unspecific" in reason
    part, reason = header.body_part(ds())
    assert part == "unknown" and "no BodyPartExamined" in reason


def test_long_description_truncated_in_reason() -> None:
    _, reason = header.body_part(ds(StudyDescription="KNEE " + "x" * 200))
    assert len(reason) < 100


@pytest.mark.parametrize("value,years", [
    ("065Y", 65.0), ("780M", 65.0), ("012W", 0.23), ("030D", 0.08), ("65", 65.0),
    ("", None), ("abc", None), ("999Y", None), ("000Y", None), ("000D", None),
])  # fmt: skip
def test_age_from_string(value: str, years: float | None) -> None:
    assert header.age_from_string(value) == years


def test_age_from_birth_and_study_date() -> None:
    assert header.age_years(ds(PatientAge="070Y", PatientBirthDate="19000101")) == 70.0
    age = header.age_years(ds(PatientBirthDate="19590115", StudyDate="20240115"))
    assert age == pytest.approx(65.0, abs=0.01)
    assert header.age_years(ds(PatientBirthDate="20300101", StudyDate="20240115")) is None
    assert header.age_years(ds(PatientBirthDate="bad", StudyDate="20240115")) is None
    assert header.age_years(ds()) is None
    # A placeholder 000Y is no age: the birth and study dates, when present, decide instead.
    age = header.age_years(ds(PatientAge="000Y", PatientBirthDate="19590115", StudyDate="20240115"))
    assert age == pytest.approx(65.0, abs=0.01)
    assert header.age_years(ds(PatientAge="000Y")) is None


@pytest.mark.parametrize("value,expected", [
    ("F", "F"), ("M", "M"), ("f", "F"), ("O", None), ("", None), ("X", None),
])  # fmt: skip
def test_sex(value: str, expected: str | None) -> None:
    assert header.sex(ds(PatientSex=value)) == expected


def test_states_body_part_is_a_flag_not_reason_text() -> None:
    assert header.states_body_part(ds(BodyPartExamined="CHEST"))
    assert header.states_body_part(ds(BodyPartExamined="KNEE"))
    assert header.states_body_part(ds(StudyDescription="XR KNEE BILAT"))
    assert not header.states_body_part(ds(BodyPartExamined="EXTREMITY"))
    assert not header.states_body_part(ds())


def test_header_values_are_checked_against_their_vr() -> None:
    """A value outside its VR's repertoire is dropped (never quoted); an over-long one is cut."""
    swallowed = "KNEE\x00\x10\x00\x10\x00PN\x12\x00DOE^JANE"  # a length that ate PatientName
    part, reason = header.body_part(ds(StudyDescription=swallowed))
    assert part == "unknown" and "DOE" not in reason and "\x00" not in reason
    part, reason = header.body_part(ds(BodyPartExamined="\x1b[2JKNEE"))
    assert part == "unknown" and "\x1b" not in reason and "no BodyPartExamined" in reason
    part, reason = header.body_part(ds(BodyPartExamined="=HYPERLINK(x)"))
    assert part == "unknown" and "HYPERLINK" not in reason
    part, reason = header.body_part(ds(BodyPartExamined="THORACOLUMBAR SPINE"))  # 19 > 16: cut
    assert part == "spine" and reason == "BodyPartExamined='THORACOLUMBAR SP'"
    assert header.sex(ds(PatientSex="F\x1b[2J")) is None
    assert header.age_years(ds(PatientAge="065Y\x00DOE")) is None
    assert header.header_text(ds(StudyDescription="x" * 100), "StudyDescription") == "x" * 64
