"""PACS in, PACS out: a DICOMweb server as a scan source, and results sent back as DICOM.

- :mod:`.url` parses ``dicomweb+http(s)://HOST:PORT/PATH`` (never with credentials in it);
- :mod:`.auth` builds the HTTP session: ``~/.netrc`` (HTTP basic) or a bearer token from
  ``OSTEOSCAN_DICOMWEB_TOKEN``; credentials never reach a message, log or output;
- :mod:`.client` talks QIDO-RS / WADO-RS / STOW-RS through ``dicomweb-client`` with timeouts,
  retries with backoff and the failure rules (unreachable or refused at start: exit 1);
- :mod:`.query` turns QIDO-RS results into :class:`~osteoscan.discover.Found` entries keyed
  ``dicomweb:<study>/<series>/<instance>`` (UIDs only), with a signature made of the attributes
  routing depends on, so a second run retrieves nothing;
- :mod:`.prefilter` applies the gate and body-part routing to the QIDO attributes *before*
  anything is retrieved: a chest radiograph is a ``skipped`` row, never a download;
- :mod:`.source` is the front end the scan pipeline calls: discover, pre-filter, fetch in chunks
  into a private cache, and the nightly memory (last run, instances to retry);
- :mod:`.results` (SR), :mod:`.kos`, :mod:`.capture` build the DICOM results and
  :mod:`.outbox` writes them (``--dicom-out``) and stores them (``--send``), retrying next run.
"""

from __future__ import annotations

SCHEME_PREFIX = "dicomweb+"


def is_dicomweb(source: object) -> bool:
    """True when a scan path is a DICOMweb server URL (``dicomweb+http://…``)."""
    return str(source).startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))
