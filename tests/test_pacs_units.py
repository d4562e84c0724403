"""The DICOMweb pieces without a server: URLs, credentials, search results, the pre-filter."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset

from osteoscan.errors import UsageError
from osteoscan.pacs.auth import TOKEN_ENV, session_for
from osteoscan.pacs.loader import cache_file, key_of
from osteoscan.pacs.prefilter import skip_reason, skipped_rows
from osteoscan.pacs.query import date_range, instances, search_filters, signature, split_key
from osteoscan.pacs.url import ServerUrl
from osteoscan.scan.routing import Router

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


def test_urls_parse_and_refuse_credentials() -> None:
    url = ServerUrl.parse("dicomweb+https://pacs.example.org:8443/dicom-web/")
    assert (url.base, url.host, url.port) == ("https://pacs.example.org:8443/dicom-web",
                                              "pacs.example.org", 8443)  # fmt: skip
    assert url.shown == "dicomweb+https://pacs.example.org:8443/dicom-web"
    with pytest.raises(UsageError, match="netrc") as err:
        ServerUrl.parse("dicomweb+http://user:hunter2@pacs:8042/dicom-web")
    assert "hunter2" not in str(err.value)
    for bad in ("http://pacs/dicom-web", "dicomweb+ftp://pacs/x", "dicomweb+http://:80/x"):
        with pytest.raises(UsageError):
            ServerUrl.parse(bad)


def _auth_header(url: ServerUrl) -> str:
    req = requests.Request("GET", url.base + "/studies")
    return str(session_for(url).prepare_request(req).headers.get("Authorization", ""))


def test_credentials_come_from_a_token_or_netrc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ServerUrl.parse("dicomweb+http://pacs.local:8042/dicom-web")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.local login scanner password s3cr3t\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert _auth_header(url).startswith("Basic ")
    monkeypatch.setenv(TOKEN_ENV, "tok-123")
    assert _auth_header(url) == "Bearer tok-123"  # the token wins over ~/.netrc
    assert "tok-123" not in repr(session_for(url).auth)
    monkeypatch.delenv(TOKEN_ENV)
    assert _auth_header(ServerUrl.parse("dicomweb+http://other:1/x")) == ""
    netrc.write_text("machine pacs.local login scanner password s3cr3t oops\n")
    with pytest.raises(UsageError) as err:
        session_for(url)
    assert "s3cr3t" not in str(err.value)


def _qido(study: str, series: str, sop: str, **attrs: str) -> dict:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.PatientName, ds.PatientID = "DOE^JANE", "PID-1"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds.to_json_dict()


def test_search_results_keep_uids_and_routing_facts_only() -> None:
    results = [
        _qido("1.2", "1.2.3", "1.2.3.4", Modality="DX", BodyPartExamined="KNEE"),
        _qido("1.2", "1.2.3", "1.2.3.4", Modality="DX", BodyPartExamined="KNEE"),  # again
        _qido("1.2", "1.2.9", "1.2.9.1", Modality="SR", Manufacturer="osteoscan"),  # ours
        _qido("1.2", "../..", "1.2.3.5", Modality="DX"),  # a hostile server's "UID"
    ]
    found, dropped = instances(results)
    assert [i.key for i in found] == ["dicomweb:1.2/1.2.3/1.2.3.4"] and dropped == 1
    assert "PatientName" not in found[0].attrs and "PatientID" not in found[0].attrs
    entry = found[0].found()
    assert str(entry.path) == "dicomweb:1.2/1.2.3/1.2.3.4" and entry.kind == "dicom"
    changed = Dataset.from_json(_qido("1.2", "1.2.3", "1.2.3.4", Modality="DX",
                                      BodyPartExamined="CHEST"))  # fmt: skip
    assert signature(changed) != signature(found[0].attrs)  # a corrected header: planned again
    assert split_key("dicomweb:1.2/1.2.3/1.2.3.4") == ("1.2", "1.2.3", "1.2.3.4")
    assert split_key("dicomweb:1.2/../x") is None and split_key("/data/x.dcm") is None
    cache = Path("/c")
    assert key_of(cache, str(cache_file(cache, entry.path.as_posix()))) == str(entry.path)


def test_date_window_and_filters() -> None:
    assert date_range("2024-01-15", "20240131") == "20240115-20240131"
    assert date_range(None, "2024-01-31") == "-20240131" and date_range(None, None) is None
    with pytest.raises(UsageError):
        date_range("2024-02-01", "2024-01-01")
    with pytest.raises(UsageError):
        date_range("yesterday", None)
    assert search_filters("20240101-", ["CR", "DX"]) == [
        {"StudyDate": "20240101-", "Modality": "CR"},
        {"StudyDate": "20240101-", "Modality": "DX"},
    ]
    assert search_filters(None, []) == [{}]


def _attrs(**kw: str) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("attrs", "skipped", "part"),
    [
        ({"Modality": "DX", "SOPClassUID": DX, "BodyPartExamined": "KNEE"}, False, "knee"),
        ({"Modality": "DX", "BodyPartExamined": "CHEST"}, True, "unknown"),
        ({"Modality": "CR", "BodyPartExamined": "LSPINE"}, True, "spine"),  # knee-only model
        ({"Modality": "CT", "SOPClassUID": CT, "BodyPartExamined": "KNEE"}, True, "knee"),
        ({"Modality": "SR", "SOPClassUID": SR}, True, "unknown"),
        ({"Modality": "OT", "SOPClassUID": SC}, False, "unknown"),  # ConversionType unknown
        ({"Modality": "OT", "SOPClassUID": SC, "ConversionType": "WSD"}, True, "unknown"),
        ({"Modality": "OT", "SOPClassUID": SC, "ConversionType": "DF"}, False, "unknown"),
        ({}, False, "unknown"),  # the server said nothing: retrieve and read the header
        ({"Modality": "DX", "BodyPartExamined": "EXTREMITY"}, False, "unknown"),
    ],
)
def test_prefilter_skips_only_on_positive_evidence(
    attrs: dict[str, str], skipped: bool, part: str
) -> None:
    router = Router([["knee"]], ["knee-default 1.0"])
    got = skip_reason(_attrs(**attrs), router)
    assert (got is not None) == skipped
    if got is not None:
        assert got[1] == part
        rows = skipped_rows("dicomweb:1/2/3", _attrs(**attrs), got[0], got[1], "t")
        assert rows[0].row.status == "skipped" and "not retrieved" in rows[0].row.reason
