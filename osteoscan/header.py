"""Routing facts and covariates from a DICOM header: body part, age, sex.

Body part is decided in this order, and the reason is always kept (``inspect`` shows it):

1. ``BodyPartExamined`` when it names the knee or the spine — standard DICOM terms (``KNEE``,
   ``LSPINE``, ``TSPINE``, ``CSPINE``, ``SSPINE``, ``SPINE``) and the free-text variants real
   archives hold (``"LUMBAR SPINE"``, ``"L-SPINE"``, ``"KNEE LEFT"``, ``"KNIE"``, ``"LWS"``…).
2. When it names another specific part (``CHEST``, ``HAND``…) the answer is ``unknown``: a
   header that says chest is not overruled by a free-text description.
3. When it is absent or unspecific (``EXTREMITY``, ``LEG``, ``OTHER``…), the first of
   ``StudyDescription``, ``SeriesDescription`` and ``ProtocolName`` that mentions the knee or the
   spine decides; otherwise ``unknown``.

``LEG`` (DICOM: lower leg) and ``EXTREMITY`` are deliberately unspecific: a lower-leg view may or
may not include the knee joint, so only a description can make it a knee.

Age comes from ``PatientAge`` (``065Y``, ``780M``, ``012W``, ``030D``) or else from
``PatientBirthDate`` and ``StudyDate`` (the birth date itself is never stored or printed). Sex
comes from ``PatientSex`` (``F``/``M``; ``O`` and anything else → ``None``).

Every value is read through :func:`header_text`: checked against its VR's length and character
repertoire (:func:`osteoscan.inert.dicom_value`) and dropped or cut when it fails, so a value
quoted in a reason is never a corrupt element's raw bytes (which may hold the patient's name).
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from pydicom.datadict import dictionary_VR

from osteoscan.inert import dicom_value

__all__ = ["body_part", "body_part_from_text", "age_years", "sex", "header_text"]

# Tokens matched on upper-cased text with non-alphanumerics turned into spaces. Multi-word terms
# are matched as phrases; single tokens as whole words (so "KNEEL" or "BACKSPINE" do not match).
_KNEE_WORDS = {
    "KNEE",
    "KNEES",
    "PATELLA",
    "PATELLAR",
    "KNIE",
    "GENOU",
    "RODILLA",
    "GINOCCHIO",
    "JOELHO",
    "TIBIAL PLATEAU",
    "TIBIA PLATEAU",
    "FEMOROTIBIAL",
    "TIBIOFEMORAL",
}
_SPINE_WORDS = {
    "SPINE",
    "LSPINE",
    "TSPINE",
    "CSPINE",
    "SSPINE",
    "LUMBAR",
    "THORACIC SPINE",
    "CERVICAL SPINE",
    "LUMBOSACRAL",
    "THORACOLUMBAR",
    "CERVICOTHORACIC",
    "VERTEBRA",
    "VERTEBRAE",
    "VERTEBRAL",
    "SACRUM",
    "COCCYX",
    "WIRBELSAEULE",
    "WIRBELSAULE",
    "LWS",
    "BWS",
    "HWS",
    "RACHIS",
    "COLUMNA",
    "L SPINE",
    "T SPINE",
    "C SPINE",
    "LS SPINE",
    "L S SPINE",
    "DORSAL SPINE",
}
# Specific non-target parts: a BodyPartExamined naming one of these is final (→ unknown).
_UNSPECIFIC = {
    "",
    "EXTREMITY",
    "LEG",
    "LOWEREXTREMITY",
    "LOWER EXTREMITY",
    "LOWER LIMB",
    "OTHER",
    "UNKNOWN",
    "NONE",
    "WHOLEBODY",
    "WHOLE BODY",
    "BODY",
    "SKELETON",
    "BONE",
    "LIMB",
}
_MAX_REASON_TEXT = 64
_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", text.upper()).split())


def _mentions(norm: str, words: set[str]) -> bool:
    padded = f" {norm} "
    return any(f" {w} " in padded for w in words)


def body_part_from_text(text: str | None) -> str:
    """``knee``, ``spine`` or ``unknown`` for a free-text body part or description.

    Knee wins when both are mentioned only if the knee is named first; ambiguity is rare in
    practice (e.g. "SPINE AND KNEE SURVEY") and the first-named part is the usual primary one.
    """
    norm = _normalise(text or "")
    # Glued forms: "L-SPINE"→"L SPINE", "LSPINE" stays one token; "KNEELEFT" style glue is rare.
    knee = _mentions(norm, _KNEE_WORDS)
    spine = _mentions(norm, _SPINE_WORDS)
    if knee and spine:
        first_knee = min(norm.find(w) for w in _KNEE_WORDS if _mentions(norm, {w}))
        first_spine = min(norm.find(w) for w in _SPINE_WORDS if _mentions(norm, {w}))
        return "knee" if first_knee < first_spine else "spine"
    if knee:
        return "knee"
    if spine:
        return "spine"
    return "unknown"


def header_text(ds: Any, keyword: str) -> str:
    """The value of ``keyword`` checked against its VR (:func:`osteoscan.inert.dicom_value`):
    ``""`` when absent, unreadable, or outside the VR's length and character repertoire.

    Every header value osteoscan shows, quotes or decides on is read through here, so a corrupt
    element that swallowed the elements after it (patient name and ID included) is dropped.
    """
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - a malformed element must not stop routing
        return ""
    if hasattr(value, "value") and hasattr(value, "VR"):  # a DataElement, not its value
        value = value.value
    return dicom_value(value, _vr(keyword)).strip()


def _vr(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "LO"  # a keyword outside the dictionary: treat as the strictest free text


def _quote(keyword: str, value: str) -> str:
    if len(value) > _MAX_REASON_TEXT:
        value = value[: _MAX_REASON_TEXT - 1] + "…"
    return f"{keyword}={value!r}"


def body_part(ds: Any) -> tuple[str, str]:
    """(``knee`` | ``spine`` | ``unknown``, reason) for a pydicom dataset; see the module docs."""
    bpe = header_text(ds, "BodyPartExamined")
    part = body_part_from_text(bpe)
    if part != "unknown":
        return part, _quote("BodyPartExamined", bpe)
    specific_other = _normalise(bpe) not in _UNSPECIFIC
    if specific_other:
        return "unknown", f"{_quote('BodyPartExamined', bpe)} is neither knee nor spine"
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        text = header_text(ds, keyword)
        part = body_part_from_text(text)
        if part != "unknown":
            return part, _quote(keyword, text)
    start = f"{_quote('BodyPartExamined', bpe)} is unspecific" if bpe else "no BodyPartExamined"
    return "unknown", f"{start}; no knee or spine term in study/series description or protocol"


def states_body_part(ds: Any) -> bool:
    """True when the header names a specific body part (knee, spine or any other, e.g. CHEST).

    Routing decides on this flag, never on reason text: a stated part is final, and only files
    that state none take ``--body-part`` or the single part the loaded models serve.
    """
    bpe = header_text(ds, "BodyPartExamined")
    return body_part(ds)[0] != "unknown" or (bool(bpe) and _normalise(bpe) not in _UNSPECIFIC)


def age_from_string(value: str | None) -> float | None:
    """Years from a DICOM AS value (``065Y``, ``780M``, ``012W``, ``030D``); ``None`` if invalid.

    A zero age (``000Y``, ``000D``…) is ``None`` too: de-identification tools and some modalities
    write it as a placeholder for "unknown", and fusing it as a real age of 0 would push every such
    adult film to "normal". A genuine newborn is outside what a bone-density screen is for.
    """
    m = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD]?)\s*", str(value or "").upper())
    if not m or int(m.group(1)) == 0:
        return None
    years = int(m.group(1)) * _AGE_UNITS[m.group(2) or "Y"]
    return round(years, 2) if 0 <= years <= 130 else None


def _date(value: str) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def age_years(ds: Any) -> float | None:
    """Patient age in years (PatientAge, else StudyDate − PatientBirthDate), or ``None``."""
    age = age_from_string(header_text(ds, "PatientAge"))
    if age is not None:
        return age
    birth = _date(header_text(ds, "PatientBirthDate"))
    study = _date(
        header_text(ds, "StudyDate")
        or header_text(ds, "SeriesDate")
        or header_text(ds, "ContentDate")
    )
    if birth is None or study is None or study < birth:
        return None
    years = (study - birth).days / 365.25
    return round(years, 2) if years <= 130 else None


def sex(ds: Any) -> str | None:
    """``"F"``, ``"M"`` or ``None`` from PatientSex (``O``, empty or odd values → ``None``)."""
    value = header_text(ds, "PatientSex").upper()
    if value in {"F", "FEMALE"}:
        return "F"
    if value in {"M", "MALE"}:
        return "M"
    return None
