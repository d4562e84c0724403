"""Clinical covariates (age, sex): parsing, the covariates CSV, and lookup by image path.

The covariates CSV (DESIGN.md) has one row per image or patient: ``path`` (path relative to the
scanned root, the file name, or the bare file stem), ``age`` (years) and ``sex`` (``F``/``M``).
Column names are configurable, so a table such as the knee-xray ``patient_details.csv``
(``Patient Id`` = file stem, ``Age``, ``Gender`` = ``male``/``female``) works as it is::

    table = CovariateTable.from_csv(csv, path_col="Patient Id", age_col="Age", sex_col="Gender")
    table.lookup(Path("osteopenia/OP12.jpg"))  # -> Covariates(age=..., sex="F")

Only age and sex are read; no other column (names, IDs, birth dates) is kept.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from osteoscan.errors import UsageError

# Plausible ages; anything outside is a data-entry error, not a covariate.
MAX_AGE_YEARS = 130.0

_SEX_ALIASES: dict[str, str] = {
    "f": "F",
    "female": "F",
    "woman": "F",
    "w": "F",
    "m": "M",
    "male": "M",
    "man": "M",
}

# DICOM Age String (AS): nnnD, nnnW, nnnM or nnnY.
_DICOM_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(frozen=True)
class Covariates:
    """Age in years and sex (``"F"``/``"M"``) of the patient of one image; either may be missing."""

    age: float | None = None
    sex: str | None = None

    def used(self) -> str:
        """Which covariates are present: ``"age,sex"``, ``"age"``, ``"sex"`` or ``""``."""
        return ",".join(n for n, v in (("age", self.age), ("sex", self.sex)) if v is not None)

    def is_empty(self) -> bool:
        """True when neither age nor sex is known."""
        return self.age is None and self.sex is None

    def override(self, other: Covariates | None) -> Covariates:
        """Fields of ``other`` that are known replace this one's (CSV overrides DICOM header)."""
        if other is None:
            return self
        return Covariates(
            age=other.age if other.age is not None else self.age,
            sex=other.sex if other.sex is not None else self.sex,
        )


def parse_sex(value: object) -> str | None:
    """``"F"``/``"M"`` from F/M/female/male/woman/man (any case, spaces ignored); else ``None``.

    ``O`` (other), empty and unknown values give ``None``: the model then does without sex.
    """
    if value is None:
        return None
    text = str(value).strip().casefold()
    return _SEX_ALIASES.get(text)


def parse_age(value: object) -> float | None:
    """Age in years from a number, a numeric string (``"65"``) or a DICOM AS (``"065Y"``).

    Returns ``None`` for empty, non-numeric, NaN, negative or implausible (> 130 years) values.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        age = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        match = _DICOM_AGE.match(text)
        if match:
            age = int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
        else:
            # Tolerate a trailing unit word ("65 years", "65y") that spreadsheets often carry.
            text = re.sub(r"\s*(years?|yrs?|y)\s*$", "", text, flags=re.IGNORECASE)
            try:
                age = float(text)
            except ValueError:
                return None
    if not math.isfinite(age) or age < 0 or age > MAX_AGE_YEARS:
        return None
    return age


def _norm(text: str) -> str:
    """Key normalisation: trimmed, case-folded, forward slashes, no leading ``./``."""
    key = str(text).strip().replace("\\", "/").casefold()
    while key.startswith("./"):
        key = key[2:]
    return key


def _find_column(header: list[str], wanted: str, role: str, path: Path) -> str:
    """The header name matching ``wanted`` exactly, else ignoring case and surrounding spaces."""
    if wanted in header:
        return wanted
    for name in header:
        if name.strip().casefold() == wanted.strip().casefold():
            return name
    shown = ", ".join(repr(h) for h in header)
    raise UsageError(
        f"covariates CSV {path.name}: no {role} column {wanted!r} (columns: {shown}); "
        f"set the column names with --covariate-columns path,age,sex"
    )


class CovariateTable:
    """Covariates keyed by image path, file name and file stem, case- and space-insensitively.

    A key that two rows with different values share (``a/N1.png`` and ``b/N1.png`` both give stem
    ``n1``) is ambiguous and is not used for that level of matching: a wrong covariate is worse
    than a missing one.
    """

    def __init__(self, rows: Iterable[tuple[str, Covariates]] = ()) -> None:
        self._by_path: dict[str, Covariates | None] = {}
        self._by_name: dict[str, Covariates | None] = {}
        self._by_stem: dict[str, Covariates | None] = {}
        self.n_rows = 0
        for key, cov in rows:
            self.add(key, cov)

    def __len__(self) -> int:
        return self.n_rows

    @staticmethod
    def _put(index: dict[str, Covariates | None], key: str, cov: Covariates) -> None:
        if key in index and index[key] != cov:
            index[key] = None  # ambiguous: two different rows claim this key
        else:
            index[key] = cov

    def add(self, key: str, cov: Covariates) -> None:
        """Register one row: ``key`` is a relative path, a file name or a bare stem."""
        norm = _norm(key)
        if not norm:
            return
        self.n_rows += 1
        pure = PurePath(norm)
        if "/" in norm:
            self._put(self._by_path, norm, cov)
        self._put(self._by_name, pure.name, cov)
        # A stem without suffix ("op12") and a name ("op12.jpg") both index the stem.
        self._put(self._by_stem, pure.stem if pure.suffix else pure.name, cov)

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        path_col: str = "path",
        age_col: str = "age",
        sex_col: str = "sex",
    ) -> CovariateTable:
        """Read a covariates CSV; column names are matched exactly, else case/space-insensitively.

        Raises :class:`UsageError` when the file is missing or lacks the path column, or lacks
        both the age and the sex column (one of them alone is fine).
        """
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"covariates CSV not found: {path}")
        # utf-8-sig: spreadsheets often write a byte-order mark before the first column name.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            key_col = _find_column(header, path_col, "path", path)
            try:
                a_col: str | None = _find_column(header, age_col, "age", path)
            except UsageError:
                a_col = None
            try:
                s_col: str | None = _find_column(header, sex_col, "sex", path)
            except UsageError:
                s_col = None
            if a_col is None and s_col is None:
                raise UsageError(
                    f"covariates CSV {path.name}: neither age column {age_col!r} nor sex column "
                    f"{sex_col!r} found (columns: {', '.join(repr(h) for h in header)})"
                )
            table = cls()
            for row in reader:
                key = (row.get(key_col) or "").strip()
                cov = Covariates(
                    age=parse_age(row.get(a_col)) if a_col else None,
                    sex=parse_sex(row.get(s_col)) if s_col else None,
                )
                table.add(key, cov)
        return table

    def lookup(self, path: str | Path, root: str | Path | None = None) -> Covariates | None:
        """Covariates for an image: by path relative to ``root``, then by trailing path parts,
        then by file name, then by bare stem. ``None`` when no unambiguous row matches."""
        p = Path(path)
        candidates: list[str] = []
        if root is not None:
            with contextlib.suppress(ValueError):  # different drive on Windows
                candidates.append(_norm(os.path.relpath(p, root)))
        parts = [_norm(x) for x in p.parts if x not in ("/", "\\")]
        # Trailing parts, longest first: "/data/knee/normal/N1.jpg" matches key "normal/n1.jpg".
        for k in range(len(parts), 1, -1):
            candidates.append("/".join(parts[-k:]))
        for key in candidates:
            cov = self._by_path.get(key)
            if cov is not None:
                return cov
        for index, key in ((self._by_name, _norm(p.name)), (self._by_stem, _norm(p.stem))):
            cov = index.get(key)
            if cov is not None:
                return cov
        return None


def write_covariates_csv(
    path: str | Path,
    rows: Mapping[str, Covariates] | Iterable[tuple[str, float | None, str | None]],
) -> Path:
    """Write a covariates CSV in the DESIGN.md format (``path,age,sex``); returns the path.

    ``rows`` is a mapping key → :class:`Covariates` or an iterable of ``(key, age, sex)``. Missing
    values are written as empty cells. Used by tests, examples and to convert other tables.
    """
    path = Path(path)
    items: Iterable[tuple[str, float | None, str | None]] = (
        ((k, c.age, c.sex) for k, c in rows.items()) if isinstance(rows, Mapping) else rows
    )
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "age", "sex"])
        for key, age, sex in items:
            age_text = "" if age is None else f"{age:g}"
            writer.writerow([key, age_text, parse_sex(sex) or ""])
    return path
