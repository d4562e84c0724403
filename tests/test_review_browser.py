"""The review page opened in a real headless browser (Debian's ``chromium``; .ci/run installs it).

Chromium is driven by its command line: ``--screenshot`` and ``--dump-dom`` (the DOM after load),
with ``--enable-logging=stderr`` so every console message, including each Content-Security-Policy
violation, reaches stderr. A page where nothing was injected produces no console message at all.
Set ``OSTEOSCAN_SCREENSHOTS=DIR`` to keep the screenshots.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from osteoscan.review import assets_folder, write_report
from osteoscan.rows import ResultRow, result_columns
from osteoscan.writers import write_csv_atomic

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)  # fmt: skip
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it)",
)


def chromium(page: Path, profile: Path, *args: str, timeout: float = 120) -> tuple[str, str, float]:
    """Open ``page`` in headless Chromium with ``args``: (stdout, console lines, seconds)."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", "--disable-background-networking",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
           page.resolve().as_uri()]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, "\n".join(console), seconds


def screenshot(page: Path, tmp_path: Path, name: str, height: int = 2400) -> Path:
    """A 1280-wide screenshot of ``page`` (kept in $OSTEOSCAN_SCREENSHOTS when set)."""
    shot = tmp_path / name
    chromium(page, tmp_path / "profile", f"--screenshot={shot}", f"--window-size=1280,{height}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = os.environ.get("OSTEOSCAN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / name)
    return shot


class Dom(HTMLParser):
    """Tags with their attributes, and the text, of a dumped DOM."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str, **where: str) -> list[dict[str, str]]:
        return [
            a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in where.items())
        ]


def assert_inert(dom: Dom) -> None:
    """Nothing in the DOM can run or fetch: no script, handler, javascript: or remote URL."""
    assert not dom.all("script") and not dom.all("iframe") and not dom.all("object")
    for tag, attrs in dom.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        for key in ("src", "href", "action", "srcset"):
            value = attrs.get(key, "").strip().lower()
            assert not value.startswith(("javascript:", "http:", "https:", "//", "data:text")), (
                tag, attrs)  # fmt: skip
        if tag == "meta":
            assert attrs.get("http-equiv", "").lower() != "refresh"


def assert_images_load(page: Path, dom: Dom) -> int:
    """Every <img> of the page names a file beside it that decodes to pixels."""
    import cv2

    imgs = dom.all("img")
    for attrs in imgs:
        src = attrs["src"]
        img = cv2.imread(str(page.parent / src.replace("%20", " ")))
        assert img is not None and img.shape[0] > 10 and img.shape[1] > 10, src
    return len(imgs)


@pytest.fixture
def hits() -> Iterator[tuple[int, list[str]]]:
    """A web server on 127.0.0.1 that records every request: (port, paths requested)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def _scan(paths: list[Path], out: Path, package: Path, **kw: object) -> Path:
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.pipeline import run_scan

    cfg = ScanConfig(paths=paths, out=out / "r.csv", heatmaps_dir=out / "hm",
                     models=[str(package)], device="cpu", workers=0, batch_size=8, **kw)  # type: ignore[arg-type]  # fmt: skip
    run_scan(cfg)
    return out / "r.csv"


def test_demo_report_in_browser(tiny_package: Callable[..., Path], tmp_path: Path) -> None:
    results = _scan([REPO / "examples" / "demo"], tmp_path / "out", tiny_package(),
                    body_part="knee", threshold=0.0)  # every scored image is flagged  # fmt: skip
    done = write_report(results, tmp_path / "out" / "report.html", heatmaps=tmp_path / "out" / "hm")
    assert done.flagged > 5 and done.thumbnails == done.flagged
    dom_text, console, _ = chromium(done.html, tmp_path / "profile", "--dump-dom")
    assert console == ""  # no script, no blocked resource, no CSP violation
    dom = Dom(dom_text)
    assert_inert(dom)
    assert len(dom.all("li", **{"class": "row"})) == done.flagged
    plots = [a for a in dom.all("img") if a.get("alt", "").endswith(" plot")]
    assert len(plots) == 3
    assert assert_images_load(done.html, dom) == 3 + 2 * done.flagged
    assert "truncated DICOM" in "".join(dom.text)  # the demo's broken file, grouped
    screenshot(done.html, tmp_path, "review-demo.png")


HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "javascript:alert(1)"]


def _hostile_archive(root: Path, port: int) -> list[str]:
    """Files whose names and headers carry markup; returns the strings to find as text."""
    from osteoscan.testing.files import write_dicom, write_png
    from osteoscan.testing.synthetic import synthetic_knee

    remote = f"http:\\\\127.0.0.1:{port}\\"  # Chromium reads backslashes as slashes in http URLs
    names = [
        "<script>alert(1)<", "\"><img src=x onerror=alert(1)>", "javascript:alert(1)",
        f"<img src={remote}img>", f"<link rel=stylesheet href={remote}css>", "=1+1",
    ]  # fmt: skip
    for i, name in enumerate(names):
        folder = root / name if name.endswith("<") else root  # '/' cannot be in a file name
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / ("script>.png" if name.endswith("<") else f"{name}.png")
        write_png(file, synthetic_knee(96, seed=i))
    headers = [
        dict(study_description=HOSTILE[0], sop_instance_uid=HOSTILE[1]),
        dict(body_part=f"<meta http-equiv=refresh content='0;url={remote}meta'>"),
        dict(series_description=HOSTILE[2], patient_sex="<b>F</b>"),
        dict(body_part=HOSTILE[0]),
    ]  # fmt: skip
    for i, kw in enumerate(headers):
        write_dicom(root / f"hostile_{i}.dcm", synthetic_knee(96, seed=10 + i),
                    patient_name="PLANTED^NAME", patient_id="PLANTED-ID-777",
                    patient_birth_date="19400101", **kw)  # type: ignore[arg-type]  # fmt: skip
    return ["<script>alert(1)</script>.png", '"><img src=x onerror=alert(1)>.png',
            "javascript:alert(1).png"]  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid headers
def test_hostile_names_and_headers_stay_text(
    tiny_package: Callable[..., Path], tmp_path: Path, hits: tuple[int, list[str]]
) -> None:
    port, requests = hits
    expect = _hostile_archive(tmp_path / "archive", port)
    results = _scan([tmp_path / "archive"], tmp_path / "out", tiny_package(), body_part="knee",
                    threshold=0.0)  # fmt: skip
    done = write_report(results, tmp_path / "out" / "report.html", heatmaps=tmp_path / "out" / "hm")
    pages = [done.html, *assets_folder(done.html).glob("*.html")]
    for page in pages:
        raw = page.read_bytes()
        for planted in (b"PLANTED", b"19400101"):
            assert planted not in raw, (page.name, planted)
    dom_text, console, _ = chromium(done.html, tmp_path / "profile", "--dump-dom")
    screenshot(done.html, tmp_path, "review-hostile.png", height=3000)
    assert requests == []  # nothing was fetched from the archive's URLs
    assert console == ""  # nothing ran and nothing was even attempted (no CSP violation)
    dom = Dom(dom_text)
    assert_inert(dom)
    text = "".join(dom.text)
    for s in expect:
        assert s in text, s  # shown as text
    assert_images_load(done.html, dom)

    # The detector itself works: the same payloads unescaped in a page without a policy are seen.
    control = tmp_path / "control.html"
    control.write_text(f"<p>{HOSTILE[0].replace('alert(1)', 'console.log(1)')}"
                       f"<img src=http:\\\\127.0.0.1:{port}\\control></p>")  # fmt: skip
    _, console, _ = chromium(control, tmp_path / "profile", "--dump-dom")
    assert "CONSOLE" in console and any("control" in r for r in requests)


def test_hostile_values_in_every_column_stay_text(
    tmp_path: Path, hits: tuple[int, list[str]]
) -> None:
    """Whatever upstream validation lets through, every CSV column reaches the page as text."""
    port, requests = hits
    bad = [*HOSTILE, f"<img src=http:\\\\127.0.0.1:{port}\\col>",
           f"<meta http-equiv=refresh content='0;url=http://127.0.0.1:{port}/go'>"]  # fmt: skip
    classes = ("normal", bad[0])
    rows = []
    for i, b in enumerate(bad):
        rows.append(ResultRow(path=f"{b}/{i}.png", frame=i, image_id=b, status="ok", reason=b,
                              body_part=b, scanned_at="2026-11-30T01:30:00Z", model=f"{b} 1",
                              probs={"normal": 0.1, bad[0]: 0.9}, prediction=b, score=0.9,
                              threshold=0.5, flagged=True, uncertainty=0.1, heatmap=b,
                              covariates=b))  # fmt: skip
        rows.append(ResultRow.error(f"{b}.dcm", f"unreadable: {b}", "2026-11-30T01:31:00Z"))
    results = write_csv_atomic(tmp_path / "r.csv", result_columns(classes), rows)
    done = write_report(results, tmp_path / "report.html")
    dom_text, console, _ = chromium(done.html, tmp_path / "profile", "--dump-dom")
    assert requests == [] and console == ""
    dom = Dom(dom_text)
    assert_inert(dom)
    text = "".join(dom.text)
    for b in bad:
        assert f"unreadable: {b}" in text and f"{b}/" in text


def _generated(path: Path, n: int, nights: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        s = float(rng.beta(2, 3))
        day = i % nights
        row = ResultRow(path=f"archive/2026/{day:02d}/knee_{i:05d}.dcm", frame=0,
                        image_id=f"1.2.826.0.1.{i}", status="ok", reason="", body_part="knee",
                        scanned_at=f"2026-11-{30 - day:02d}T01:{i % 60:02d}:00Z",
                        model="knee-default 1.0.0", probs={"normal": 1 - s, "osteopenia": s / 2,
                        "osteoporosis": s / 2}, prediction="normal", score=s, threshold=0.103,
                        flagged=s >= 0.103, uncertainty=float(rng.uniform(0, 0.2)),
                        covariates="age,sex")  # fmt: skip
        if i % 97 == 0:
            row = ResultRow.error(row.path, "truncated DICOM: pixel data ends early",
                                  row.scanned_at)  # fmt: skip
        rows.append(row)
    return write_csv_atomic(path, result_columns(("normal", "osteopenia", "osteoporosis")), rows)


@pytest.mark.slow  # 20-30 s on 2 shared cores: generating 10,000 rows and 47 pages dominates
def test_ten_thousand_rows_render_quickly(tmp_path: Path) -> None:
    results = _generated(tmp_path / "r.csv", 10_000, nights=14)
    t0 = time.perf_counter()
    done = write_report(results, tmp_path / "report.html")
    write_s = time.perf_counter() - t0
    folder = assets_folder(done.html)
    sizes = [p.stat().st_size for p in [done.html, *folder.glob("flagged-*.html")]]
    assert max(sizes) < 2_000_000 and done.pages == -(-done.flagged // 200)
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><title>blank</title>")
    _, console, blank_s = chromium(tmp_path / "blank.html", tmp_path / "profile", "--dump-dom")
    dom_text, console, main_s = chromium(done.html, tmp_path / "profile", "--dump-dom")
    _, _, last_s = chromium(folder / f"flagged-{done.pages:03d}.html", tmp_path / "profile",
                            "--dump-dom")  # fmt: skip
    print(
        f"10,000 rows ({done.flagged} flagged, {done.pages} pages, largest page "
        f"{max(sizes) / 1e6:.2f} MB): written in {write_s:.1f} s; Chromium load+dump: main "
        f"{main_s:.1f} s, last page {last_s:.1f} s, an empty page {blank_s:.1f} s"
    )
    assert console == ""
    assert main_s - blank_s < 5.0 and last_s - blank_s < 5.0  # the page's own share
    assert len(Dom(dom_text).all("li", **{"class": "row"})) == 200
    screenshot(done.html, tmp_path, "review-10k.png", height=2400)


@pytest.mark.slow
def test_default_model_on_examples_with_report(tmp_path: Path) -> None:
    """Issue 16's check: the demo archive scanned with the bundled model, then its page."""
    from osteoscan.review import default_heatmaps_dir, report_after_scan
    from osteoscan.scan.config import ScanConfig
    from osteoscan.scan.pipeline import run_scan

    html = tmp_path / "report.html"
    cfg = ScanConfig(paths=[REPO / "examples"], out=tmp_path / "r.csv", device="cpu",
                     heatmaps_dir=default_heatmaps_dir(html))  # fmt: skip
    summary = run_scan(cfg)
    done = report_after_scan(cfg, summary, html)
    assert done.flagged == summary.totals["flagged"] > 0 and done.thumbnails == done.flagged
    dom_text, console, _ = chromium(done.html, tmp_path / "profile", "--dump-dom")
    assert console == ""
    dom = Dom(dom_text)
    assert len(dom.all("li", **{"class": "row"})) == done.flagged
    assert assert_images_load(done.html, dom) == 3 + 2 * done.flagged
    assert "model card" in "".join(dom.text)
    screenshot(done.html, tmp_path, "review-default-model.png", height=3000)
    assert re.search(r"knee-default \S+", "".join(dom.text))


@pytest.mark.slow
def test_nightly_wrapper_writes_the_page(tmp_path: Path) -> None:
    """examples/nightly: after a good night the review page is there and every image loads."""
    import sys

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("knee_001.dcm", "knee_002.dcm", "truncated_001.dcm"):
        shutil.copy(REPO / "examples" / "demo" / "dicom" / name, archive / name)
    env = dict(os.environ, OSTEOSCAN_ARCHIVE=str(archive), OSTEOSCAN_OUTDIR=str(tmp_path / "out"),
               OSTEOSCAN_VENV=sys.prefix)  # fmt: skip
    wrapper = REPO / "examples" / "nightly" / "osteoscan-nightly.sh"
    run = subprocess.run(["bash", str(wrapper)], env=env, capture_output=True, text=True,
                         timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0 and run.stderr == "", run.stderr
    page = tmp_path / "out" / "report.html"
    assert "review page:" in (tmp_path / "out" / "nightly.log").read_text()
    dom_text, console, _ = chromium(page, tmp_path / "profile", "--dump-dom")
    assert console == ""
    dom = Dom(dom_text)
    assert assert_images_load(page, dom) >= 3
    assert "truncated DICOM" in "".join(dom.text)
