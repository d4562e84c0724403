"""Routing of frames to model packages by body part (issue 4, "Routing")."""

from __future__ import annotations

import pickle

import pytest

from osteoscan.frames import ImageFrame
from osteoscan.scan.routing import Route, Router, file_body_part


def frame(kind: str = "dicom", part: str = "unknown", reason: str = "") -> ImageFrame:
    # What the DICOM reader sets: a header naming any specific part (CHEST too) states it.
    stated = part != "unknown" or reason == CHEST
    return ImageFrame(
        path="x", kind=kind, body_part=part, body_part_reason=reason, body_part_stated=stated
    )


CHEST = "BodyPartExamined='CHEST' is neither knee nor spine"
NONE = "no BodyPartExamined; no knee or spine term in study/series description or protocol"


def test_header_body_part_routes_to_serving_package() -> None:
    r = Router([["knee"], ["spine"]], ["knee-pkg 1", "spine-pkg 1"])
    assert r.route(frame(part="knee", reason="BodyPartExamined='KNEE'")).package == 0
    assert r.route(frame(part="spine", reason="BodyPartExamined='LSPINE'")).package == 1


def test_override_never_beats_a_dicom_header() -> None:
    r = Router([["knee"], ["spine"]], ["k", "s"], override="knee")
    # Header says spine → spine model, whatever --body-part says.
    assert r.route(frame(part="spine", reason="BodyPartExamined='LSPINE'")).package == 1
    # Header says chest → skipped, --body-part knee does not turn a chest into a knee.
    route = r.route(frame(part="unknown", reason=CHEST))
    assert route.package is None
    assert "CHEST" in route.reason and "no model installed for body part unknown" in route.reason
    assert "--body-part" not in route.reason


def test_override_applies_to_files_without_body_part() -> None:
    r = Router([["knee"]], ["k"], override="knee")
    assert r.route(frame(kind="png")).package == 0
    assert r.route(frame(kind="jpeg")).body_part == "knee"
    assert r.route(frame(kind="dicom", reason=NONE)).package == 0  # DICOM with no body part info
    assert file_body_part(frame(kind="png")) is None


def test_auto_gives_files_without_body_part_the_single_served_part() -> None:
    r = Router([["knee"]], ["k"])  # --body-part auto, the default knee model alone
    assert r.route(frame(kind="png")) == Route(0, "knee")
    assert r.route(frame(kind="dicom", reason=NONE)) == Route(0, "knee")
    # A header naming another part is still final, and so is a spine header.
    assert r.route(frame(part="unknown", reason=CHEST)).package is None
    assert r.route(frame(part="spine", reason="BodyPartExamined='LSPINE'")).package is None
    assert Router([["spine"]], ["s"]).route(frame(kind="jpeg")) == Route(0, "spine")


def test_unknown_with_several_served_parts_is_skipped_with_hint() -> None:
    route = Router([["knee"], ["spine"]], ["k", "s"]).route(frame(kind="png"))
    assert route.package is None and route.body_part == "unknown"
    assert "--body-part knee|spine" in route.reason


def test_spine_without_spine_model_says_so() -> None:
    route = Router([["knee"]], ["knee-default 1.0"]).route(frame(part="spine", reason="x"))
    assert route.package is None and route.body_part == "spine"
    assert route.reason.startswith("spine image but no spine model installed")
    assert "--model" in route.reason and "knee-default 1.0 serves knee" in route.reason


def test_override_spine_with_only_knee_model_is_skipped() -> None:
    route = Router([["knee"]], ["k"], override="spine").route(frame(kind="png"))
    assert route.package is None and route.body_part == "spine"


def test_first_package_wins_for_shared_body_part_and_router_pickles() -> None:
    r = Router([["knee"], ["knee", "spine"]], ["a", "b"])
    assert r.route(frame(part="knee")).package == 0
    assert r.route(frame(part="spine")).package == 1
    assert pickle.loads(pickle.dumps(r)).route(frame(part="spine")).package == 1


def test_bad_override_is_refused() -> None:
    with pytest.raises(ValueError):
        Router([["knee"]], override="chest")
