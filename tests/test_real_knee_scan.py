"""Scanning real knee radiographs the way the default model is judged (issue 5, "Done when").

Held-out knee films are scored twice by the maintainers: as plain JPEGs, and as DICOM files that
carry the patient's age and sex. Both must be *scored* by ``osteoscan scan`` with no further
options (a JPEG states no body part; the default knee model is the only one loaded), the DICOMs
with age and sex fused in, the JPEGs image-only. Runs on a handful of the real development images
from ``../shared`` (copied into a temporary folder, never into the repository); skips without it.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from osteoscan.cli import app
from osteoscan.manifest import DEFAULT_MODEL
from osteoscan.readers import read_frames
from osteoscan.testing.synthetic import write_dicom

KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray"
pytestmark = pytest.mark.skipif(not KNEE.is_dir(), reason="../shared/data/knee-xray not present")
runner = CliRunner()
STEMS = {"normal": ["N10", "N12"], "osteopenia": ["OP20", "OP30"], "osteoporosis": ["OS10", "OS20"]}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {Path(r["path"]).stem: r for r in csv.DictReader(fh)}


def _scan(folder: Path, out: Path) -> dict[str, dict[str, str]]:
    res = runner.invoke(app, ["scan", str(folder), "--out", str(out), "--quiet", "--workers", "0"])
    assert res.exit_code == 0, res.output
    return _rows(out)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six real JPEGs, and the same pixels as 8-bit DICOMs with and without age/sex."""
    root = tmp_path_factory.mktemp("real")
    table = pd.read_csv(KNEE / "patient_details.csv").set_index("Patient Id")
    dirs = {k: root / k for k in ("jpeg", "dicom_cov", "dicom_bare")}
    for d in dirs.values():
        d.mkdir()
    for cls, stems in STEMS.items():
        for stem in stems:
            src = KNEE / cls / f"{stem}.jpg"
            if not src.is_file():
                pytest.skip(f"{src} not present")
            shutil.copy(src, dirs["jpeg"] / src.name)
            grey = read_frames(src)[0].image  # what the reader sees: grey, [0, 1]
            pixels = np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)
            sex = "F" if str(table.loc[stem, "Gender"]).strip().lower() == "female" else "M"
            age = f"{int(table.loc[stem, 'Age']):03d}Y"
            # No BodyPartExamined: converted films often lack it, and they must still be scored.
            common = {"bits_stored": 8, "body_part": None, "modality": "CR"}
            write_dicom(dirs["dicom_cov"] / f"{stem}.dcm", pixels, patient_age=age,
                        patient_sex=sex, **common)  # fmt: skip
            write_dicom(dirs["dicom_bare"] / f"{stem}.dcm", pixels, patient_age=None,
                        patient_sex=None, patient_birth_date=None, **common)  # fmt: skip
    return dirs


def test_real_jpegs_and_dicoms_are_scored_without_options(
    archive: dict[str, Path], tmp_path: Path
) -> None:
    jpeg = _scan(archive["jpeg"], tmp_path / "jpeg.csv")
    cov = _scan(archive["dicom_cov"], tmp_path / "cov.csv")
    bare = _scan(archive["dicom_bare"], tmp_path / "bare.csv")
    stems = [s for group in STEMS.values() for s in group]
    for rows in (jpeg, cov, bare):
        assert sorted(rows) == sorted(stems)
        for r in rows.values():
            assert r["status"] == "ok", r["reason"]
            assert r["body_part"] == "knee" and r["model"].startswith(DEFAULT_MODEL)
            probs = [float(r[f"p_{c}"]) for c in ("normal", "osteopenia", "osteoporosis")]
            assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert all(r["covariates"] == "" for r in jpeg.values())
    assert all(r["covariates"] == "" for r in bare.values())
    assert all(r["covariates"] == "age,sex" for r in cov.values())
    for stem in stems:
        # Same pixels (8-bit) → same image-only score from the JPEG and its bare DICOM.
        assert float(bare[stem]["score"]) == pytest.approx(float(jpeg[stem]["score"]), abs=0.02)
        # Image-only rows and fused rows use their own thresholds (see ensemble.py).
        assert bare[stem]["threshold"] == jpeg[stem]["threshold"] != cov[stem]["threshold"]
    # Age and sex move the scores: the fused ones are not the image-only ones.
    diffs = [abs(float(cov[s]["score"]) - float(bare[s]["score"])) for s in stems]
    assert max(diffs) > 0.01
