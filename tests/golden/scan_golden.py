"""Scan the demo archive and a fixed subset of real knee radiographs; rows without ``scanned_at``.

Used two ways: ``python -m tests.golden.scan_golden`` (re)writes the expected CSVs next to this
file, with the code of the commit it runs on; ``tests/test_golden_scan.py`` compares a fresh scan
with them, so a refactor of the scan path must reproduce every column of every row.
Images are copied to a temporary folder, never into the repository.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEMO = REPO / "examples" / "demo"
KNEE_XRAY = REPO.parent / "shared" / "data" / "knee-xray"
PER_CLASS = 4  # first N files (sorted) of each class folder: 12 real radiographs
DROP = {"scanned_at"}


def knee_subset(dest: Path) -> Path:
    """Copy the first PER_CLASS images of each knee-xray class into ``dest`` (returned)."""
    for cls in ("normal", "osteopenia", "osteoporosis"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for src in sorted((KNEE_XRAY / cls).iterdir())[:PER_CLASS]:
            shutil.copy2(src, dest / cls / src.name)
    return dest


def scan_rows(root: Path, work: Path) -> list[dict[str, str]]:
    """Run ``osteoscan scan`` on ``root`` (heatmaps for flagged rows); rows with relative paths."""
    out = work / "results.csv"
    cmd = [sys.executable, "-m", "osteoscan", "scan", str(root), "--out", str(out),
           "--heatmaps", str(work / "heat"), "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=work, capture_output=True, text=True)
    rows = []
    with open(out, newline="") as fh:
        for row in csv.DictReader(fh):
            row["path"] = Path(row["path"]).relative_to(root).as_posix()
            if row.get("heatmap"):
                row["heatmap"] = Path(row["heatmap"]).name
            rows.append({k: v for k, v in row.items() if k not in DROP})
    return rows


def write_rows(rows: list[dict[str, str]], target: Path) -> None:
    """Write golden rows as CSV (columns in the order scanned)."""
    with open(target, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_rows(target: Path) -> list[dict[str, str]]:
    """Read golden rows written by :func:`write_rows`."""
    with open(target, newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    """Regenerate ``demo.csv`` and ``knee.csv`` with the code as it is now."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "demo_work").mkdir()
        write_rows(scan_rows(DEMO, t / "demo_work"), HERE / "demo.csv")
        knees = knee_subset(t / "knees")
        (t / "knee_work").mkdir()
        write_rows(scan_rows(knees, t / "knee_work"), HERE / "knee.csv")


if __name__ == "__main__":
    main()
