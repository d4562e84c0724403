"""The review page's data, thumbnails, escaping and files (no browser: see test_review_browser)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from osteoscan.review import assets_folder, write_report
from osteoscan.review.data import gather, night_of
from osteoscan.review.markup import POLICY, clean, esc
from osteoscan.review.thumbs import OVERLAY_ALPHA, unblend
from osteoscan.rows import ResultRow, ScoredRow, result_columns
from osteoscan.scan.state import ScanState, default_state_path
from osteoscan.writers import heatmap_name, write_csv_atomic

CLASSES = ("normal", "osteopenia", "osteoporosis")


def make_row(i: int, *, score: float | None = None, status: str = "ok", night: int = 0,
             reason: str = "", path: str | None = None) -> ResultRow:  # fmt: skip
    """A results row; ``night`` days before 2026-11-30, scanned at 01:30 UTC."""
    s = (i * 0.6180339) % 1.0 if score is None else score
    path = path or f"archive/knee_{i:05d}.png"
    row = ResultRow(path=path, frame=0, image_id=f"1.2.826.0.1.{i}", status=status,
                    reason=reason, body_part="knee",
                    scanned_at=f"2026-11-{30 - night:02d}T01:30:{i % 60:02d}Z")  # fmt: skip
    if status == "ok":
        row.model, row.prediction, row.score, row.threshold = "tiny-knee 0.0.1", "normal", s, 0.5
        row.probs = {"normal": 1 - s, "osteopenia": s / 2, "osteoporosis": s / 2}
        row.flagged, row.uncertainty, row.covariates = s >= 0.5, 0.05, "age,sex" if i % 2 else ""
    return row


def write_results(path: Path, rows: list[ResultRow]) -> Path:
    """A results CSV the way scan writes it (columns and cell formats of osteoscan.rows)."""
    return write_csv_atomic(path, result_columns(CLASSES), rows)


def test_night_is_noon_to_noon_utc_named_by_its_evening() -> None:
    assert night_of("2026-12-01T01:30:00Z") == "2026-11-30"
    assert night_of("2026-11-30T23:50:00Z") == "2026-11-30"  # a run crossing midnight: one night
    assert night_of("2026-11-30T11:59:59Z") == "2026-11-29"
    assert night_of("garbage") == "unknown"


def test_gather_sorts_flagged_by_score_and_groups_problems(tmp_path: Path) -> None:
    rows = [make_row(i, score=s) for i, s in enumerate([0.7, 0.2, 0.95, 0.5, 0.8])]  # scan order
    rows += [
        make_row(
            10 + i,
            status="error",
            path=f"a/bad{i}.dcm",
            reason=f"truncated DICOM: a/bad{i}.dcm ends early",
        )
        for i in range(5)
    ]
    rows += [make_row(20, status="skipped", reason="not a radiograph")]  # fmt: skip
    data = gather(write_results(tmp_path / "r.csv", rows))
    assert [r.score for r in data.flagged] == [0.95, 0.8, 0.7, 0.5]
    assert data.totals == {"ok": 5, "skipped": 1, "error": 5, "missing": 0, "flagged": 4,
                           "rows": 11}  # fmt: skip
    top = data.problems[0]
    assert (top.status, top.count, top.reason) == ("error", 5, "truncated DICOM: <file> ends early")
    assert len(top.examples) == 3
    assert data.thresholds == [0.5]
    assert data.run.new == 11 and data.run.night == "2026-11-29"


def test_unblend_recovers_the_radiograph_under_the_heatmap() -> None:
    from osteoscan.gradcam import overlay
    from osteoscan.testing.synthetic import synthetic_knee

    assert inspect.signature(overlay).parameters["alpha"].default == OVERLAY_ALPHA
    grey = (synthetic_knee(128, seed=3) * 65535).astype(np.uint16)
    yy, xx = np.mgrid[0:128, 0:128]
    heat = np.exp(-((yy - 60) ** 2 + (xx - 70) ** 2) / 800.0).astype(np.float32)
    rgb = overlay(grey, heat)
    got = unblend(rgb).astype(int)
    want = np.round(grey / 65535.0 * 255).astype(int)
    assert np.abs(rgb.astype(int).mean(axis=2) - want).mean() > 10  # the overlay is coloured
    assert np.abs(got - want).max() <= 3


@pytest.mark.parametrize(
    "hostile",
    ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "javascript:alert(1)",
     "x\x1b[2J\u202eevil"],
)  # fmt: skip
def test_escaping_makes_hostile_text_inert(hostile: str) -> None:
    out = esc(hostile)
    assert "<" not in out and '"' not in out and "\x1b" not in out and "\u202e" not in out
    assert len(clean("a" * 5000)) < 400


def test_report_files_pages_and_images(tmp_path: Path) -> None:
    import cv2

    rows = [make_row(i, score=0.5 + (i % 500) / 1000) for i in range(450)]  # all flagged
    rows += [make_row(1000 + i, score=0.1) for i in range(50)]
    results = write_results(tmp_path / "r.csv", rows)
    hm = tmp_path / "hm"  # heatmap PNGs for the top rows only: the rest get a placeholder
    hm.mkdir()
    for r in sorted(rows, key=lambda r: -(r.score or 0))[:3]:
        rgb = np.zeros((200, 120, 3), np.uint8)
        rgb[..., 0] = 200
        cv2.imwrite(str(hm / heatmap_name(r.image_id)), rgb)
    done = write_report(results, tmp_path / "out" / "report.html", heatmaps=hm, page_size=200)
    assert (done.flagged, done.pages, done.thumbnails) == (450, 3, 3)
    text = done.html.read_text()
    assert f'content="{POLICY.replace(chr(39), "&#x27;")}"' in text
    assert "script" not in text.lower().replace("no script", "")
    assert text.count('class="row"') == 200 and text.count('class="ph"') == 197
    folder = assets_folder(done.html)
    pages = sorted(p.name for p in folder.glob("flagged-*.html"))
    assert pages == ["flagged-002.html", "flagged-003.html"]
    assert folder.joinpath("flagged-003.html").read_text().count('class="row"') == 50
    for page in [done.html, *folder.glob("flagged-*.html")]:
        for src in re.findall(r'<img [^>]*src="([^"]+)"', page.read_text()):
            img = cv2.imread(str(page.parent / src))
            assert img is not None and img.size > 0, src
    # a smaller report later: pages and thumbnails it no longer names are removed
    write_report(write_results(results, rows[:10]), done.html, heatmaps=hm)
    assert not list(folder.glob("flagged-*.html"))


def test_trend_has_one_point_per_night_from_the_state(tmp_path: Path) -> None:
    rows = [make_row(i, night=i % 4) for i in range(40)]
    rows += [make_row(100 + n, status="error", night=n, reason="bad") for n in range(4)]
    results = write_results(tmp_path / "r.csv", rows)
    with ScanState.open(default_state_path(results)) as state:
        state.record([ScoredRow(r) for r in rows], "key")
    data = gather(results, state=default_state_path(results))
    assert [n.night for n in data.nights] == ["2026-11-26", "2026-11-27", "2026-11-28",
                                              "2026-11-29"]  # fmt: skip
    assert [n.rows for n in data.nights] == [11, 11, 11, 11]
    assert all(n.error == 1 for n in data.nights)
    assert sum(n.flagged for n in data.nights) == data.totals["flagged"]


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from osteoscan.cli import app, main

    results = write_results(tmp_path / "r.csv", [make_row(i) for i in range(20)])
    runner = CliRunner()
    ok = runner.invoke(app, ["report", str(results), "--html", str(tmp_path / "r.html")])
    assert ok.exit_code == 0, ok.output
    assert "review page:" in ok.output and (tmp_path / "r.html").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(results), "--html", str(tmp_path / "x.html"),
              "--state", str(tmp_path / "nope.sqlite")])  # fmt: skip
    assert exc.value.code == 2
    assert "no such state file" in capsys.readouterr().err


def test_empty_results_and_after_scan(tmp_path: Path) -> None:
    from osteoscan.review import report_after_scan
    from osteoscan.scan.config import ScanConfig, ScanSummary

    results = write_results(tmp_path / "r.csv", [])
    cfg = ScanConfig(paths=[tmp_path], out=results)
    summary = ScanSummary(
        n_files=0, n_ignored=0, rows=0, counts={"unchanged": 7}, elapsed_s=125.0,
        images_per_s=0.0, out=results, flagged_out=tmp_path / "r.flagged.csv", hdf5=None,
        heatmaps_dir=None, models=[], device="cpu", workers=0, batch_size=1,
    )  # fmt: skip
    done = report_after_scan(cfg, summary, tmp_path / "page.html")
    text = done.html.read_text()
    assert done.flagged == 0 and "(none)" in text and "2 min 5 s, measured by the scan" in text
    assert "unchanged files</th><td>7" in text
