"""Behaviour pinned across refactors: a scan reproduces the committed rows column by column.

The expected CSVs in ``tests/golden/`` were written by ``python -m tests.golden.scan_golden`` on the
code before the scan path was split into stages (issue 10). Every column but ``scanned_at`` must
match; probabilities to 1e-5: the same code gives results up to 3e-6 apart on CPUs whose oneDNN
kernels differ (measured: AVX2 against AVX-512), while a change of behaviour moves them by far more.
Regenerate them only for a deliberate, documented change of behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden.scan_golden import DEMO, HERE, KNEE_XRAY, knee_subset, read_rows, scan_rows

FLOAT_COLS = ("score", "threshold", "uncertainty")


def _assert_same(got: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w), "columns differ"
        for col, expected in w.items():
            actual = g[col]
            if expected and (col.startswith("p_") or col in FLOAT_COLS):
                assert float(actual) == pytest.approx(float(expected), abs=1e-5), (w["path"], col)
            else:
                assert actual == expected, (w["path"], col, actual, expected)


def test_demo_archive_rows_unchanged(tmp_path: Path) -> None:
    _assert_same(scan_rows(DEMO, tmp_path), read_rows(HERE / "demo.csv"))


@pytest.mark.skipif(not KNEE_XRAY.is_dir(), reason="../shared/data/knee-xray not present")
def test_real_knee_rows_unchanged(tmp_path: Path) -> None:
    root = knee_subset(tmp_path / "knees")
    work = tmp_path / "work"
    work.mkdir()
    _assert_same(scan_rows(root, work), read_rows(HERE / "knee.csv"))
