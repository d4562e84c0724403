"""Clinical covariates (age, sex): parsing, the covariates CSV, and lookup by image path.

The covariates CSV (DESIGN.md) has one row per image or patient: ``path`` (path relative to the
scanned root, the file name, or the bare file stem), ``age`` (years) and ``sex`` (``F``/``M``).
Column names are configurable, so a table such as the knee-xray ``patient_details.csv``
(``Patient Id`` = file stem, ``Age``, ``Gender`` = ``male``/``female``) works as it is::

    table = CovariateTable.from_csv(csv, path_col="Patient Id", age_col="Age", sex_col="Gender")
    table.lookup(Path("osteopenia/OP12.jpg"))  # -> Covariates(age=..., sex="F")

Only age and sex are read; no other column (names, IDs, birth dates) is kept.

:class:`CovariateTally` says what happened on a run: how many images got age/sex from the DICOM
header, from the CSV, or not at all, and which CSV rows matched no image or held unusable values
(``sixty``, ``-5``, ``250``, sex ``X``). It returns messages; it never prints. Names and values
quoted in its messages come from the CSV and the archive: they are inert text
(:func:`osteoscan.inert.log_safe`, cut short).

:func:`write_covariates_csv` writes keys as inert cells (a key starting with ``=`` gets a leading
``'``, OWASP); :meth:`CovariateTable.from_csv` drops that ``'`` again, so such a file reads back
the same. Ages are written as plain numbers and never prefixed.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from osteoscan.errors import UsageError
from osteoscan.inert import cap, csv_cell, log_safe, uncell

# Plausible ages; anything outside is a data-entry error, not a covariate.
MAX_AGE_YEARS = 130.0

_SEX_ALIASES: dict[str, str] = {
    "f": "F", "female": "F", "woman": "F", "w": "F", "m": "M", "male": "M", "man": "M",
}  # fmt: skip

# Cells that mean "not recorded" (and for sex: other, unknown) are dropped silently; any other
# value that does not parse is a data-entry error the run reports.
_NA = {"", "-", "?", "na", "n/a", "nan", "none", "null", "unknown", "not known"}
_NOT_RECORDED = {"age": _NA, "sex": _NA | {"o", "other", "u"}}
_EXAMPLES = 5  # examples quoted per warning

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


def _find_column(header: list[str], wanted: str, role: str, path: Path, need: bool = True) -> str:
    """The header name matching ``wanted`` exactly, else ignoring case and surrounding spaces;
    ``""`` when there is none and ``need`` is false."""
    if wanted in header:
        return wanted
    for name in header:
        if name.strip().casefold() == wanted.strip().casefold():
            return name
    if not need:
        return ""
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
        # Each index maps a key to a row id, or to -1 when two rows with different values claim it.
        self._by_path: dict[str, int] = {}
        self._by_name: dict[str, int] = {}
        self._by_stem: dict[str, int] = {}
        self._rows: list[Covariates] = []
        self.keys: list[str] = []  # the CSV's key of each row, as written
        self._same: dict[int, int] = {}  # row id -> an earlier row with the same key and values
        # (row key, column, value) of cells that held a value that could not be used
        self.unusable: list[tuple[str, str, str]] = []
        for key, cov in rows:
            self.add(key, cov)

    def __len__(self) -> int:
        return len(self._rows)

    def _put(self, index: dict[str, int], key: str, row: int) -> None:
        old = index.get(key)
        if old is None:
            index[key] = row
        elif old >= 0 and self._rows[old] == self._rows[row]:
            self._same[row] = old
        else:
            index[key] = -1  # ambiguous: two different rows claim this key

    def add(self, key: str, cov: Covariates) -> None:
        """Register one row: ``key`` is a relative path, a file name or a bare stem."""
        norm = _norm(key)
        if not norm:
            return
        row = len(self._rows)
        self._rows.append(cov)
        self.keys.append(str(key).strip())
        pure = PurePath(norm)
        if "/" in norm:
            self._put(self._by_path, norm, row)
        self._put(self._by_name, pure.name, row)
        # A stem without suffix ("op12") and a name ("op12.jpg") both index the stem.
        self._put(self._by_stem, pure.stem if pure.suffix else pure.name, row)

    def same_row(self, row: int) -> int:
        """The row whose index entries ``row`` shares (itself unless it repeats an earlier row)."""
        return self._same.get(row, row)

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
            a_col = _find_column(header, age_col, "age", path, need=False)
            s_col = _find_column(header, sex_col, "sex", path, need=False)
            if not a_col and not s_col:
                raise UsageError(
                    f"covariates CSV {path.name}: neither age column {age_col!r} nor sex column "
                    f"{sex_col!r} found (columns: {', '.join(repr(h) for h in header)})"
                )
            table = cls()
            for row in reader:
                key = uncell((row.get(key_col) or "").strip())
                age_raw = row.get(a_col) if a_col else None
                sex_raw = row.get(s_col) if s_col else None
                cov = Covariates(age=parse_age(age_raw), sex=parse_sex(sex_raw))
                for col, raw, value in (("age", age_raw, cov.age), ("sex", sex_raw, cov.sex)):
                    text = (raw or "").strip()
                    if key and value is None and text.casefold() not in _NOT_RECORDED[col]:
                        table.unusable.append((key, col, text))
                table.add(key, cov)
        return table

    def match(self, path: str | Path, root: str | Path | None = None) -> int | None:
        """Row id for an image: by path relative to ``root``, then by trailing path parts, then
        by file name, then by bare stem. ``None`` when no unambiguous row matches."""
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
            row = self._by_path.get(key, -1)
            if row >= 0:
                return row
        for index, key in ((self._by_name, _norm(p.name)), (self._by_stem, _norm(p.stem))):
            row = index.get(key, -1)
            if row >= 0:
                return row
        return None

    def lookup(self, path: str | Path, root: str | Path | None = None) -> Covariates | None:
        """Covariates for an image (see :meth:`match`); ``None`` when no unambiguous row matches."""
        row = self.match(path, root)
        return None if row is None else self._rows[row]

    def row(self, row: int) -> Covariates:
        """The covariates of row ``row`` (an id from :meth:`match`)."""
        return self._rows[row]


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
            writer.writerow([csv_cell(key), age_text, parse_sex(sex) or ""])
    return path


_QUOTED_CHARS = 120  # of one name or value quoted in a message


def _some(items: Iterable[str]) -> str:
    """The first few ``items`` and how many more: ``'a', 'b' and 3 more`` (inert, short)."""
    listed = [cap(log_safe(item), _QUOTED_CHARS) for item in items]
    more = len(listed) - _EXAMPLES
    return ", ".join(listed[:_EXAMPLES]) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class CovariateSummary:
    """Where the age/sex of a run's images came from, and what the CSV could not give.

    An image counts as ``from_csv`` when the CSV gave it a value (the CSV overrides the header),
    as ``from_header`` when only its DICOM header did, and as ``none`` otherwise.
    """

    n_images: int = 0
    from_header: int = 0
    from_csv: int = 0
    none: int = 0
    csv: str | None = None
    csv_rows: int = 0
    unmatched_rows: tuple[str, ...] = ()
    images_without_row: tuple[str, ...] = ()
    unusable: tuple[tuple[str, str, str], ...] = ()

    def line(self) -> str:
        """One log line: ``age/sex for 120 images: 80 from DICOM headers, 30 from ..., 10 none``."""
        return (
            f"age/sex for {self.n_images} images: {self.from_header} from DICOM headers, "
            f"{self.from_csv} from the covariates CSV, {self.none} none"
        )

    def warnings(self) -> list[str]:
        """Problems a person should fix (empty when there are none); counts and a few examples."""
        out: list[str] = []
        name, n_rows = self.csv or "covariates CSV", self.csv_rows
        if n_rows and len(self.unmatched_rows) == n_rows and self.n_images:
            out.append(
                f"{name}: none of its {n_rows} rows matches an image (e.g. "
                f"{_some(repr(k) for k in self.unmatched_rows)}); rows are matched by path "
                "relative to the data folder, file name or file stem: check the path column"
            )
        elif self.csv is not None and self.images_without_row:
            out.append(
                f"{name}: {len(self.images_without_row)} of {self.n_images} images have no row "
                f"(e.g. {_some(self.images_without_row)})"
            )
        if self.unusable:
            cells = _some(f"{col} {val!r} for {key}" for key, col, val in self.unusable)
            out.append(f"{name}: {len(self.unusable)} unusable value(s) ignored ({cells})")
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: the counts and the warnings."""
        keys = ("n_images", "from_header", "from_csv", "none", "csv_rows")
        return {
            **{k: getattr(self, k) for k in keys},
            "csv_rows_unmatched": len(self.unmatched_rows),
            "images_without_row": len(self.images_without_row),
            "unusable_values": len(self.unusable),
            "warnings": self.warnings(),
        }


@dataclass
class CovariateTally:
    """Resolve each image's covariates (header, overridden by the CSV) and count the sources.

    ``cov = tally.resolve(Covariates(frame.age, frame.sex), path, root)`` per image, then
    :meth:`summary` once. Works without a table (then only header and none are counted).
    """

    table: CovariateTable | None = None
    csv: str | None = None  # name shown in messages (the CSV's file name)
    _counts: dict[str, int] = field(
        init=False, default_factory=lambda: {"header": 0, "csv": 0, "none": 0}
    )
    _matched: set[int] = field(init=False, default_factory=set)
    _without_row: list[str] = field(init=False, default_factory=list)

    @classmethod
    def from_csv(
        cls, path: str | Path | None, columns: Iterable[str] = ("path", "age", "sex")
    ) -> CovariateTally:
        """A tally over the covariates CSV at ``path`` (``None``: header covariates only)."""
        if path is None:
            return cls()
        return cls(CovariateTable.from_csv(path, *columns), Path(path).name)

    def resolve(
        self, header: Covariates, path: str | Path, root: str | Path | None = None
    ) -> Covariates:
        """The image's covariates: ``header`` with the CSV's known values over it; counted."""
        t = self.table
        row = t.match(path, root) if t is not None else None
        csv_cov = t.row(row) if t is not None and row is not None else Covariates()
        if t is not None and row is not None:
            self._matched.add(t.same_row(row))
        elif t is not None:
            self._without_row.append(Path(path).name)
        source = "none" if header.is_empty() else "header"
        self._counts["csv" if not csv_cov.is_empty() else source] += 1
        return header.override(csv_cov)

    def summary(self) -> CovariateSummary:
        """Counts so far, unmatched CSV rows and unusable CSV values."""
        t, c, seen = self.table or CovariateTable(), self._counts, self._matched
        return CovariateSummary(
            n_images=sum(c.values()), from_header=c["header"], from_csv=c["csv"], none=c["none"],
            csv=self.csv, csv_rows=len(t), images_without_row=tuple(self._without_row),
            unmatched_rows=tuple(k for i, k in enumerate(t.keys) if t.same_row(i) not in seen),
            unusable=tuple(t.unusable),
        )  # fmt: skip
