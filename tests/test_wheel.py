"""A built wheel carries the default model: installed, it scans from any folder with no options."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a wheel is built from; copied so the build never writes build/ into the shared tree.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "osteoscan", "models")


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OSTEOSCAN_MODELS")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with osteoscan installed from a wheel built now; dependencies come from the
    test environment (a .pth file), so nothing is downloaded."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("not a source checkout")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    wheels, venv = root / "dist", root / "venv"
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], root)
    # --system-site-packages would expose the base interpreter's packages, not this test
    # environment's; a .pth line appends the latter after the venv's own site-packages, so the
    # wheel's osteoscan comes first (and the test environment's editable-install hook, a .pth
    # file of its own, is not run).
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    script = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = _run([python, "-c", script], root).stdout.strip()
    Path(purelib, "_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("osteoscan-*.whl"))
    _run([*pip, "--python", python, "install", "--no-deps", str(wheel)], root)
    return venv


def test_installed_wheel_scans_the_demo_with_the_default_model(
    wheel_venv: Path, tmp_path: Path
) -> None:
    demo = shutil.copytree(REPO / "examples" / "demo", tmp_path / "demo")
    work = tmp_path / "empty"  # no models/ folder here, no source tree above
    work.mkdir()
    where = _run(
        [str(wheel_venv / "bin" / "python"), "-c", "import osteoscan; print(osteoscan.__file__)"],
        work,
    ).stdout.strip()
    assert Path(where).is_relative_to(wheel_venv), where  # the wheel copy, not the source tree
    _run([str(wheel_venv / "bin" / "osteoscan"), "scan", str(demo), "--out", "r.csv"], work)
    with (work / "r.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["model"].startswith("knee-default ") for r in ok)
    assert all(r["p_normal"] and r["score"] for r in ok)
