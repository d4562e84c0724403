"""The gate and body-part routing applied to QIDO-RS attributes, before any pixel is retrieved.

The rules are osteoscan's own (:func:`osteoscan.readers.dicom.non_image_reason`,
:func:`osteoscan.gate.dicom_decision`, :class:`osteoscan.scan.routing.Router` on
:func:`osteoscan.header.body_part`), fed the attributes the search returned. An instance is
skipped here only on *positive* evidence: a server that does not return an attribute must not
make a knee radiograph look like something else, so whatever the attributes do not settle is
retrieved and decided again on the full header by the load stage. A chest radiograph
(``BodyPartExamined`` CHEST), a CT slice or a structured report is a ``skipped`` row and is
never downloaded.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from osteoscan import header
from osteoscan.frames import ImageFrame
from osteoscan.gate import GateCode, dicom_decision
from osteoscan.inert import valid_uid
from osteoscan.readers.dicom import non_image_reason
from osteoscan.rows import ResultRow, ScoredRow
from osteoscan.scan.routing import Router

NOT_RETRIEVED = " (decided from the server's search attributes; not retrieved)"


def _info(ds: Dataset) -> dict[str, object]:
    """The gate's header facts (as the DICOM reader names them) from the search attributes."""
    it = ds.get("ImageType")
    values = [] if it is None else [str(it)] if isinstance(it, str) else [str(v) for v in it]
    return {
        "modality": str(ds.get("Modality", "") or ""),
        "sop_class_uid": str(ds.get("SOPClassUID", "") or ""),
        "image_type": values,
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
        "conversion_type": str(ds.get("ConversionType", "") or ""),
        "presentation_intent": str(ds.get("PresentationIntentType", "") or ""),
    }


def skip_reason(ds: Dataset, router: Router) -> tuple[str, str] | None:
    """(reason, body part) when ``ds`` will certainly not be scored; None: retrieve it."""
    part, _why = header.body_part(ds)
    reason = non_image_reason(ds)
    if reason:
        return reason, part
    info = _info(ds)
    if info["modality"] or info["sop_class_uid"]:
        decision = dicom_decision(info)
        settled = decision.code not in (GateCode.NO_MODALITY, GateCode.SECONDARY_CAPTURE) or (
            # "a picture of a screen" only when the server told us the ConversionType
            decision.code is GateCode.SECONDARY_CAPTURE and "ConversionType" in ds
        )
        if not decision.passed and settled:
            return decision.reason, part
    if header.states_body_part(ds):  # a stated body part is final (routing rules)
        frame = ImageFrame(path="", body_part=part, body_part_stated=True,
                           body_part_reason=header.body_part(ds)[1])  # fmt: skip
        route = router.route(frame)
        if route.package is None:
            return route.reason, route.body_part
    return None


def skipped_rows(key: str, ds: Dataset, reason: str, part: str, now: str) -> list[ScoredRow]:
    """The ``skipped`` rows of one instance (one per frame, as a folder scan writes them)."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    uid = uid if valid_uid(uid) else ""  # as the reader: image_id only from a valid UID
    n = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    if non_image_reason(ds):
        n = 1  # the reader writes one row for a non-image object
    return [
        ScoredRow(
            ResultRow(
                path=key,
                frame=i,
                image_id=uid + (f":{i}" if n > 1 else ""),
                status="skipped",
                reason=reason + NOT_RETRIEVED,
                body_part=part,
                scanned_at=now,
            ),
            n,
        )  # fmt: skip
        for i in range(n)
    ]
