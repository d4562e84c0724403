"""QIDO-RS search → :class:`~osteoscan.discover.Found` entries keyed by UIDs only.

Each instance becomes ``dicomweb:<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>`` (the
state's ``path``; patient identifiers never appear in it) with kind ``dicom`` and a signature
``(0, h)``: ``h`` hashes the QIDO attributes routing depends on. The state skips an instance whose
signature is unchanged, so a second run retrieves nothing, and a header corrected on the server
(``BodyPartExamined`` CHEST → KNEE) is planned again.

Only the non-identifying attributes listed in :data:`FIELDS` are kept from a search result; the
patient's name, ID and birth date a server returns anyway are dropped here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from osteoscan.discover import Found
from osteoscan.errors import UsageError

PREFIX = "dicomweb:"
ROOT = Path(PREFIX)
# Attributes asked for and kept (routing, gate, covariates the header would give, our own results).
FIELDS: tuple[str, ...] = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "StudyDate", "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName",
    "ImageType", "PhotometricInterpretation", "SamplesPerPixel", "ConversionType",
    "PresentationIntentType", "NumberOfFrames", "Manufacturer",
)  # fmt: skip
# What routing and the gate decide on: the signature covers these.
SIGNED: tuple[str, ...] = FIELDS[3:15]
DEFAULT_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG", "OT")
OUR_MANUFACTURER = "osteoscan"  # results we stored are never scanned themselves
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class Instance:
    """One QIDO result: its UIDs, its kept attributes (``attrs``) and the state's key."""

    study: str
    series: str
    sop: str
    attrs: Dataset

    @property
    def key(self) -> str:
        """``dicomweb:<study>/<series>/<instance>``."""
        return f"{PREFIX}{self.study}/{self.series}/{self.sop}"

    def found(self) -> Found:
        """The entry the plan stage takes, with the signature of the routing attributes."""
        return Found(Path(self.key), ROOT, "dicom", "", (0, signature(self.attrs)))


def split_key(key: str) -> tuple[str, str, str] | None:
    """(study, series, instance) of a ``dicomweb:`` key, or None for anything else."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split("/")
    if len(parts) != 3 or not all(_UID.fullmatch(p) and len(p) <= 64 for p in parts):
        return None
    return parts[0], parts[1], parts[2]


def signature(attrs: Dataset) -> int:
    """A stable 62-bit hash of the routing attributes (the state's ``mtime_ns`` slot)."""
    values = {k: str(attrs.get(k, "") or "") for k in SIGNED}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return int(digest[:15], 16)


def qido_date(text: str, option: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` → ``YYYYMMDD``; UsageError otherwise."""
    raw = str(text).strip().replace("-", "")
    try:
        return _dt.datetime.strptime(raw, "%Y%m%d").strftime("%Y%m%d")
    except ValueError:
        raise UsageError(f"{option} takes a date YYYY-MM-DD, not {text!r}") from None


def date_range(since: str | None, until: str | None) -> str | None:
    """The QIDO ``StudyDate`` range for ``since``..``until`` (inclusive), or None for all."""
    if not since and not until:
        return None
    lo = qido_date(since, "--since") if since else ""
    hi = qido_date(until, "--until") if until else ""
    if lo and hi and lo > hi:
        raise UsageError("--since is after --until")
    return f"{lo}-{hi}"


def _kept(result: Mapping[str, Any]) -> Dataset | None:
    """The :data:`FIELDS` of one QIDO JSON result as a dataset (None when it will not parse)."""
    from pydicom.datadict import tag_for_keyword

    wanted = {f"{tag_for_keyword(k):08X}" for k in FIELDS}
    try:
        return Dataset.from_json({t: v for t, v in result.items() if t.upper() in wanted})
    except Exception:  # noqa: BLE001 - a malformed result is dropped, counted as ignored
        return None


def instances(results: Iterable[Mapping[str, Any]]) -> tuple[list[Instance], int]:
    """Parse QIDO results: (instances, number dropped: malformed, bad UIDs or our own results).

    Duplicates (the same instance found by two modality searches) are kept once.
    """
    out: dict[str, Instance] = {}
    dropped = 0
    for result in results:
        ds = _kept(result)
        uids = [str(ds.get(k, "") or "") for k in FIELDS[:3]] if ds is not None else []
        if ds is None or not all(_UID.fullmatch(u) and len(u) <= 64 for u in uids):
            dropped += 1
            continue
        if str(ds.get("Manufacturer", "") or "").strip().lower() == OUR_MANUFACTURER:
            continue  # an SR, KOS or heatmap capture this tool stored: not an input
        inst = Instance(uids[0], uids[1], uids[2], ds)
        out.setdefault(inst.key, inst)
    return list(out.values()), dropped


def search_filters(date: str | None, modalities: Sequence[str]) -> list[dict[str, str]]:
    """One QIDO filter set per modality (servers differ on multi-value matching)."""
    base = {"StudyDate": date} if date else {}
    return [{**base, "Modality": m} for m in modalities] or [base]
