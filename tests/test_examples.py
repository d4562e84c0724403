"""The examples/ a new user or an IT team copies: the demo generator and the nightly wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "examples" / "nightly" / "osteoscan-nightly.sh"


def _nightly(archive: Path, outdir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        OSTEOSCAN_ARCHIVE=str(archive),
        OSTEOSCAN_OUTDIR=str(outdir),
        OSTEOSCAN_VENV=sys.prefix,  # the environment running the tests has osteoscan installed
    )
    return subprocess.run(
        ["bash", str(WRAPPER)], env=env, capture_output=True, text=True, timeout=300
    )


def test_make_demo_rebuilds_the_committed_file_set(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_demo
    finally:
        sys.path.pop(0)
    written = make_demo.build(tmp_path / "demo", size=128)
    got = sorted(str(p.relative_to(tmp_path / "demo")) for p in written)
    committed = sorted(
        str(p.relative_to(REPO / "examples" / "demo"))
        for p in (REPO / "examples" / "demo").rglob("*")
        if p.is_file()
    )
    assert got == committed


def test_nightly_wrapper_logs_and_keeps_exit_codes(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    (archive / "dicom").mkdir(parents=True)
    for name in ("knee_001.dcm", "knee_002.dcm", "chest_001.dcm"):
        src = REPO / "examples" / "demo" / "dicom" / name
        (archive / "dicom" / name).write_bytes(src.read_bytes())
    ok = _nightly(archive, tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""  # cron mails output: a good night is silent
    log = (tmp_path / "out" / "nightly.log").read_text()
    assert "nightly scan done" in log
    assert (tmp_path / "out" / "results.csv").is_file()
    assert (tmp_path / "out" / "results.h5").is_file()

    bad = _nightly(tmp_path / "not-mounted", tmp_path / "out")
    assert bad.returncode == 2
    assert "failed with exit 2" in bad.stderr
    assert "misconfigured" in (tmp_path / "out" / "nightly.log").read_text()
