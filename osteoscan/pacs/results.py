"""DICOM results of one scored image: a Comprehensive SR, a KOS per study, a heatmap capture.

**SR template ("osteoscan screening result", version 1).** A Comprehensive SR (highdicom),
``VerificationFlag`` UNVERIFIED, ``PreliminaryFlag`` PRELIMINARY, ``CompletionFlag`` COMPLETE,
``Manufacturer`` osteoscan, in a new series of the *source study*. Its content tree::

    CONTAINER (LN 18748-4 "Diagnostic imaging report")
      CONTAINS TEXT (DCM 121106 "Comment")           research use, not for clinical use
      CONTAINS TEXT (DCM 111001 "Algorithm Name")    model package name
      CONTAINS TEXT (DCM 111003 "Algorithm Version") package version
      CONTAINS TEXT (DCM 111002 "Algorithm Parameters") identity sha, covariates used, software
      CONTAINS NUM  (99OSTEO p-<class> "Probability of <class>") per class, UCUM "1"
      CONTAINS TEXT (99OSTEO prediction)              the most probable class
      CONTAINS NUM  (99OSTEO score / threshold / uncertainty)
      CONTAINS TEXT (99OSTEO flag)                    "flagged" or "not flagged"
      CONTAINS IMAGE (DCM 121112 "Source of Measurement") the scored instance (and frame)

Codes of the private scheme ``99OSTEO`` are declared in ``CodingSchemeIdentificationSequence``.

**Identifiers.** These objects belong in the patient's study, so they carry the source's patient
and study attributes (name, ID, birth date, sex, accession number, study UID/ID/date/time,
referring physician), unlike the CSV, HDF5 and logs. Every copied value is checked against its
VR first (:func:`osteoscan.inert.dicom_value`): a hostile or corrupt header value is dropped or
cut, never copied into an invalid object. UIDs of the new objects are new (``highdicom.UID()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from osteoscan import __version__
from osteoscan.inert import dicom_value, log_safe, valid_uid
from osteoscan.rows import ResultRow

MANUFACTURER = "osteoscan"
RESEARCH_USE = (
    "Research use only, not for clinical use. Automated osteoporosis screening result by "
    "osteoscan; not verified by a physician."
)
SR_SERIES_NUMBER, KOS_SERIES_NUMBER, SC_SERIES_NUMBER = 9701, 9702, 9703
SCHEME = "99OSTEO"
# (keyword, VR) copied from the source: patient and study modules, and the instance's identity
COPIED: tuple[tuple[str, str], ...] = (
    ("PatientName", "PN"), ("PatientID", "LO"), ("PatientBirthDate", "DA"),
    ("PatientSex", "CS"), ("StudyID", "SH"), ("AccessionNumber", "SH"), ("StudyDate", "DA"),
    ("StudyTime", "TM"), ("ReferringPhysicianName", "PN"), ("StudyInstanceUID", "UI"),
    ("SeriesInstanceUID", "UI"), ("SOPInstanceUID", "UI"), ("SOPClassUID", "UI"),
)  # fmt: skip


def evidence_of(source: Dataset) -> Dataset | None:
    """The source's identity, patient and study attributes, each checked against its VR.

    None when a UID is missing or invalid (no valid object can reference it). A multi-valued
    value (all of these hold one) is dropped; PatientSex keeps only M, F or O.
    """
    out = Dataset()
    for keyword, vr in COPIED:
        try:
            raw = source.get(keyword, "")
        except Exception:  # noqa: BLE001 - a malformed element is dropped like a bad value
            raw = ""
        value = dicom_value(raw, vr)
        if "\\" in value:  # all of these hold one value: several means a corrupt element
            value = ""
        if vr == "UI" and not valid_uid(value):
            return None
        if keyword == "PatientSex" and value not in ("M", "F", "O"):
            value = ""
        setattr(out, keyword, value)
    for keyword in ("Rows", "Columns"):  # an image: a KOS then lists it as IMAGE, not COMPOSITE
        value = source.get(keyword)
        if isinstance(value, int) and 0 < value < 65536:
            setattr(out, keyword, value)
    return out


def _concept(code: str, meaning: str, scheme: str = SCHEME) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(code, scheme, meaning[:64])


def _text(code: str, meaning: str, value: str, scheme: str = SCHEME) -> Any:
    from highdicom.sr import TextContentItem

    # visible escapes first: no ESC, bidi override or other control reaches a viewer
    checked = dicom_value(log_safe(value), "UT") or "-"
    return TextContentItem(name=_concept(code, meaning, scheme), value=checked,
                           relationship_type="CONTAINS")  # fmt: skip


def _num(code: str, meaning: str, value: float) -> Any:
    from highdicom.sr import NumContentItem

    return NumContentItem(name=_concept(code, meaning), value=float(value),
                          unit=_concept("1", "no units", "UCUM"),
                          relationship_type="CONTAINS")  # fmt: skip


def _coding_schemes() -> list[Any]:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [CodingSchemeIdentificationItem(designator=SCHEME, name="osteoscan result codes")]


def screening_sr(
    evidence: Dataset, row: ResultRow, model: Mapping[str, str], n_frames: int = 1
) -> Dataset:
    """The SR of one scored row (see the module docstring). ``model``: name, version, sha."""
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, ContentSequence, ImageContentItem

    items = [
        _text("121106", "Comment", RESEARCH_USE, "DCM"),
        _text("111001", "Algorithm Name", model.get("name", "") or row.model, "DCM"),
        _text("111003", "Algorithm Version", model.get("version", ""), "DCM"),
        _text(
            "111002",
            "Algorithm Parameters",
            f"package identity {model.get('sha', '')}; covariates used: "
            f"{row.covariates or 'none'}; osteoscan {__version__}",
            "DCM",
        ),  # fmt: skip
    ]
    items += [_num(f"p-{c}"[:16], f"Probability of {c}", p) for c, p in row.probs.items()]
    items.append(_text("prediction", "Predicted class", row.prediction or ""))
    for code, meaning, value in (
        ("score", "Screening score", row.score),
        ("threshold", "Screening threshold", row.threshold),
        ("uncertainty", "Ensemble uncertainty", row.uncertainty),
    ):
        if value is not None:
            items.append(_num(code, meaning, value))
    items.append(_text("flag", "Screening flag", "flagged" if row.flagged else "not flagged"))
    items.append(
        ImageContentItem(
            name=_concept("121112", "Source of Measurement", "DCM"),
            referenced_sop_class_uid=evidence.SOPClassUID,
            referenced_sop_instance_uid=evidence.SOPInstanceUID,
            referenced_frame_numbers=row.frame + 1 if n_frames > 1 else None,
            relationship_type="CONTAINS",
        )
    )
    root = ContainerContentItem(name=_concept("18748-4", "Diagnostic imaging report", "LN"))
    root.ContentSequence = ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="osteoscan screening result (research use)",
        coding_schemes=_coding_schemes(),
    )  # fmt: skip


def flagged_kos(evidence: Sequence[Dataset]) -> Dataset:
    """A Key Object Selection ("Of Interest") listing the flagged images of one study."""
    import highdicom as hd
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument

    unique = list({ds.SOPInstanceUID: ds for ds in evidence}.values())
    content = KeyObjectSelection(
        document_title=_concept("113000", "Of Interest", "DCM"), referenced_objects=unique,
        description="osteoscan: flagged for low bone density (research use, not for clinical "
        "use; unverified)",
    )  # fmt: skip
    return KeyObjectSelectionDocument(
        evidence=unique, content=content, series_instance_uid=hd.UID(),
        series_number=KOS_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER,
    )  # fmt: skip


def burn_in(rgb: np.ndarray, text: str = "NOT FOR DIAGNOSTIC USE") -> np.ndarray:
    """``rgb`` (uint8, H×W×3) with ``text`` burned in along its top edge, on a black band."""
    import cv2

    out = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    width = out.shape[1]
    scale = max(width / 900.0, 0.35)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    scale *= min(1.0, (width - 8) / max(tw, 1))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    band = min(out.shape[0], th + base + 8)
    out[:band] = 0
    cv2.putText(out, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)  # fmt: skip
    return out


def heatmap_capture(evidence: Dataset, rgb: np.ndarray, orientation: Any = None) -> Dataset:
    """A secondary capture of the heatmap overlay ``rgb``, "NOT FOR DIAGNOSTIC USE" burned in.

    ``orientation`` is the source's PatientOrientation value (two codes such as ``["A", "F"]``),
    copied when valid; else the capture's PatientOrientation is empty (Type 2), never made up.
    """
    import highdicom as hd

    ev = evidence
    sc = hd.sc.SCImage(
        patient_orientation=("L", "F"),  # highdicom insists on one: replaced just below
        pixel_array=burn_in(rgb), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=ev.StudyInstanceUID,
        series_instance_uid=hd.UID(), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        patient_id=ev.PatientID or None, patient_name=ev.PatientName or None,
        patient_birth_date=ev.PatientBirthDate or None, patient_sex=ev.PatientSex or None,
        accession_number=ev.AccessionNumber or None, study_id=ev.StudyID or None,
        study_date=ev.StudyDate or None, study_time=ev.StudyTime or None,
        referring_physician_name=ev.ReferringPhysicianName or None,
        series_description="osteoscan heatmap - NOT FOR DIAGNOSTIC USE",
    )  # fmt: skip
    parts = dicom_value(orientation, "CS").split("\\")
    sc["PatientOrientation"].value = parts if len(parts) == 2 and all(parts) else ""
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = "Grad-CAM heatmap of an automated screening model. NOT FOR DIAGNOSTIC USE."
    return sc
