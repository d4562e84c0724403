#!/usr/bin/env python3
"""Generate the demo archive in ``examples/demo/`` (committed; re-run to rebuild it).

Everything here is synthetic: radiograph-like knee phantoms made by
:mod:`osteoscan.testing.synthetic`, with realistic DICOM headers (age, sex, body part, study
description) and *fake* patient names and IDs, so the demo also shows that identities never reach
osteoscan's outputs. The archive holds:

- ``demo/dicom/``: knee DX files, some JPEG 2000 lossless, one MONOCHROME1 (as CR plates store
  them), a knee known only from its StudyDescription, a lumbar-spine DX (skipped unless a spine
  model is installed), a chest DX (never scored by a knee model), a structured report (not an
  image) and a truncated file (an ``error`` row with a reason);
- ``demo/png/``: the same knees as 16-bit PNG plus ``covariates.csv`` (age, sex per file), to show
  scanning plain images with ``--body-part knee --covariates``.

The phantoms are not real anatomy: the scores the default model gives them say nothing clinical.

Usage: ``python examples/make_demo.py [--out examples/demo] [--size 512]``
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from pydicom.uid import JPEG2000Lossless, generate_uid

from osteoscan.testing.synthetic import (
    synthetic_chest,
    synthetic_knee,
    write_dicom,
    write_png,
    write_structured_report,
)

# (file stem, trabecular density, age, sex): low density mimics osteoporotic texture.
KNEES = [
    ("knee_001", 1.00, 34, "M"),
    ("knee_002", 0.85, 47, "F"),
    ("knee_003", 0.60, 58, "F"),
    ("knee_004", 0.45, 66, "F"),
    ("knee_005", 0.30, 74, "F"),
    ("knee_006", 0.90, 52, "M"),
    ("knee_007", 0.35, 81, "M"),
    ("knee_008", 0.70, 63, "F"),
]
UID_ROOT = "1.2.826.0.1.3680043.10.1499.9."  # deterministic UIDs so rebuilds are comparable


def _uid(name: str) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=["osteoscan-demo", name])


def build(out: Path, size: int) -> list[Path]:
    """Write the demo archive under ``out`` (replacing it) and return the files written."""
    if out.exists():
        shutil.rmtree(out)
    dicom_dir, png_dir = out / "dicom", out / "png"
    written: list[Path] = []
    rows = []
    for i, (stem, density, age, sex) in enumerate(KNEES):
        img = synthetic_knee(size, seed=100 + i, density=density, both_knees=True)
        compressed = i % 2 == 1
        written.append(
            write_dicom(
                dicom_dir / f"{stem}.dcm",
                img,
                photometric="MONOCHROME1" if i == 2 else "MONOCHROME2",
                bits_stored=12,
                modality="DX",
                body_part=None if i == 5 else "KNEE",
                study_description="XR KNEE BILATERAL AP STANDING",
                series_description="AP",
                patient_age=f"{age:03d}Y",
                patient_sex=sex,
                patient_name=f"DEMO^PATIENT{i + 1:02d}",
                patient_id=f"DEMO-{i + 1:04d}",
                sop_instance_uid=_uid(stem),
                transfer_syntax=JPEG2000Lossless if compressed else "1.2.840.10008.1.2.1",
            )
        )
        written.append(write_png(png_dir / f"{stem}.png", img, bits=16))
        rows.append({"path": f"{stem}.png", "age": age, "sex": sex})
    with open(png_dir / "covariates.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "age", "sex"])
        writer.writeheader()
        writer.writerows(rows)
    written.append(png_dir / "covariates.csv")

    written.append(
        write_dicom(
            dicom_dir / "chest_001.dcm",
            synthetic_chest(size, seed=7),
            body_part="CHEST",
            study_description="XR CHEST PA",
            patient_age="055Y",
            patient_sex="M",
            patient_name="DEMO^CHEST",
            patient_id="DEMO-CHEST",
            sop_instance_uid=_uid("chest_001"),
        )
    )
    spine = synthetic_knee(size, seed=9, density=0.8)  # stand-in pixels; the header routes it
    written.append(
        write_dicom(
            dicom_dir / "spine_001.dcm",
            spine,
            body_part="LSPINE",
            study_description="XR LUMBAR SPINE AP",
            patient_age="069Y",
            patient_sex="F",
            patient_name="DEMO^SPINE",
            patient_id="DEMO-SPINE",
            sop_instance_uid=_uid("spine_001"),
        )
    )
    written.append(write_structured_report(dicom_dir / "report_001.dcm"))
    # A transfer cut short: header intact, pixel data missing its second half.
    good = dicom_dir / "knee_001.dcm"
    data = good.read_bytes()
    truncated = dicom_dir / "truncated_001.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    written.append(truncated)
    return written


def main() -> None:
    """Command-line entry: rebuild the demo archive."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    files = build(args.out, args.size)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files, {total / 1e6:.1f} MB, under {args.out}")


if __name__ == "__main__":
    main()
