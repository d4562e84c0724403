"""Keep what a scanned file says inert: spreadsheet cells, log text and DICOM header values.

Every file name and every header value is written by someone else (an archive fed by many systems
and people), so osteoscan treats them as hostile data. This module holds the few rules, applied
where such text leaves osteoscan:

- **CSV/TSV cells** (:func:`csv_cell`): control characters become visible escapes, the cell is
  cut to :data:`MAX_CELL_CHARS`, and a cell beginning with ``=``, ``+``, ``-``, ``@``, tab or
  carriage return gets a leading ``'`` (OWASP, "CSV injection") so a spreadsheet shows it as
  text instead of running it as a formula. A cell that is a plain number (``-0.5``, ``1e-3``)
  stays as it is: a number is not a formula, and negative values must stay numeric. Raw values
  are kept in the HDF5 and the state.
- **Log text** (:func:`log_safe`): no raw control character, ANSI escape, bidirectional override
  or undecodable byte reaches a terminal or a log; each becomes a visible escape (``\\x1b``).
- **DICOM header values** (:func:`dicom_value`): checked against their VR's length and character
  repertoire (PS3.5 Table 6.2-1) and cut or dropped when they fail, so a corrupt element that
  swallowed the elements after it (patient name and ID included) is dropped, not copied.
  :func:`valid_uid` says whether a value is a UID (``image_id`` is one only then).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "MAX_CELL_CHARS",
    "FORMULA_PREFIXES",
    "cap",
    "csv_cell",
    "dicom_value",
    "log_safe",
    "neutralise",
    "uncell",
    "unquote",
    "valid_uid",
]

# A few KB: the longest real path (PATH_MAX, 4096 bytes) fits; a swallowed header does not, and
# every output reads back with the csv module's default field limit (128 KiB).
MAX_CELL_CHARS = 4096
CUT_MARK = "…[cut]"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# A plain number: what a spreadsheet reads as a value, never as a formula.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# C0 and C1 controls, DEL, lone surrogates (undecodable bytes of a file name, surrogateescape),
# bidirectional overrides/isolates (they reorder what a person reads), line/paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def log_safe(text: object) -> str:
    """``text`` with every control character, ANSI escape, bidi override and undecodable byte
    written as a visible escape (``\\x1b``, ``\\n``→``\\x0a``, ``\\u202e``): one inert line."""
    return _UNSAFE.sub(_escape, str(text))


def cap(text: str, limit: int = MAX_CELL_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, marked as cut when it was."""
    if len(text) <= limit:
        return text
    return text[: max(limit - len(CUT_MARK), 0)] + CUT_MARK


def neutralise(cell: str) -> str:
    """A leading ``'`` on a cell a spreadsheet would read as a formula (plain numbers stay)."""
    if cell.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def csv_cell(value: object, limit: int = MAX_CELL_CHARS) -> str:
    """One text cell of a CSV/TSV osteoscan writes: visible escapes, capped, neutralised."""
    return neutralise(cap(log_safe(value), limit))


def uncell(cell: str) -> str:
    """Undo :func:`neutralise` on a cell read back (``'=x`` → ``=x``; other cells unchanged)."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_PREFIXES):
        return cell[1:]
    return cell


# A quoted value in an exception message: 'x', "x", b'x' (Python's repr quoting).
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"', re.DOTALL)


def unquote(message: str) -> str:
    """``message`` with every quoted value replaced by ``'…'``: for quoting a parser's error
    about a file's content without quoting the content (which may hold a patient's name)."""
    return _QUOTED.sub("'…'", message)


# -- DICOM value representations (PS3.5 Table 6.2-1) ------------------------------------------
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_DEFAULT_TEXT = re.compile(r"[^\x00-\x1a\x1c-\x1f\x7f\\]*")  # ESC (\x1b) allowed: ISO 2022
_LONG_TEXT = re.compile(r"[^\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]*")  # + TAB LF FF CR, backslash
# CS as real archives write it: the DICOM repertoire (A-Z, 0-9, space, underscore) plus lower case
# and the punctuation of free text ("L-SPINE", "Knee/Left") that routing must still understand.
_CODE = re.compile(r"[A-Za-z0-9 _\-./]*")
# VR → (maximum length in characters, pattern the whole value must match, cut when too long)
_VRS: dict[str, tuple[int, re.Pattern[str], bool]] = {
    "AE": (16, _DEFAULT_TEXT, False),
    "AS": (4, re.compile(r"\d{1,3}[DWMYdwmy]?"), False),  # "65Y", "65": archives drop zeros
    "CS": (16, _CODE, True),
    "DA": (8, re.compile(r"\d{8}"), False),
    "DS": (16, re.compile(r"[0-9+\-Ee. ]*"), False),
    "DT": (26, re.compile(r"[0-9+\-. ]*"), False),
    "IS": (12, re.compile(r"[0-9+\- ]*"), False),
    "LO": (64, _DEFAULT_TEXT, True),
    "LT": (10240, _LONG_TEXT, True),
    "PN": (64 * 3 + 2, _DEFAULT_TEXT, False),
    "SH": (16, _DEFAULT_TEXT, True),
    "ST": (1024, _LONG_TEXT, True),
    "TM": (14, re.compile(r"[0-9.: ]*"), False),
    "UC": (MAX_CELL_CHARS, _DEFAULT_TEXT, True),
    "UI": (64, _UID, False),
    "UT": (MAX_CELL_CHARS, _LONG_TEXT, True),
}


def valid_uid(value: object) -> bool:
    """True for a DICOM UID (VR UI): at most 64 characters, numeric components separated by
    dots, no leading zero in a component (PS3.5 9.1)."""
    text = str(value or "").rstrip("\x00 ")
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def _check(text: str, vr: str) -> str:
    limit, pattern, cut = _VRS[vr]
    if pattern.fullmatch(text) is None:
        return ""  # wrong characters: a corrupt or hostile value, nothing of it is kept
    if len(text) > limit:
        # Text and codes may be cut (a sloppy "THORACOLUMBAR SPINE" still routes); a cut number,
        # date or UID would be another value, so it goes.
        return text[:limit].rstrip() if cut else ""
    return text


def dicom_value(value: Any, vr: str) -> str:
    """A header value as text, checked against ``vr``: ``""`` when it fails.

    Padding (spaces, NUL) is stripped. Multi-valued text is checked value by value and joined
    with ``\\``; a value outside the VR's character repertoire or (for codes, numbers, dates and
    UIDs) over its length is dropped; text and codes (CS, LO, SH, ST, LT, UC, UT) are cut.
    Bytes (an element pydicom could not decode) are dropped. An unknown VR keeps only text that
    passes :func:`log_safe` unchanged, cut to 64 characters.
    """
    if value is None or isinstance(value, (bytes, bytearray, memoryview)):
        return ""
    items = list(value) if isinstance(value, (list, tuple)) or _is_multi(value) else [value]
    out = []
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            return ""
        text = str(item if item is not None else "").strip("\x00 ")
        unknown_ok = text[:64] if log_safe(text) == text else ""
        checked = _check(text, vr) if vr in _VRS else unknown_ok
        if text and not checked:
            return ""  # one bad value spoils the element: it is one corrupt field
        out.append(checked)
    return "\\".join(out)


def _is_multi(value: Any) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, MultiValue)
