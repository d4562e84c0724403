"""Tests for duplicate detection: bytes, decoded pixels, verified near-duplicates, conflicts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from osteoscan.testing.synthetic import synthetic_knee, write_png
from osteoscan.train.data import LabelledSample, load_labelled
from osteoscan.train.dedup import find_duplicates, fingerprint, fingerprint_files, verify_near

KNEE = Path("/work/shared/data/knee-xray")


def _knee(seed: int, density: float = 1.0, size: int = 96) -> np.ndarray:
    return synthetic_knee(size, seed=seed, density=density)


@pytest.fixture()
def corpus(tmp_path: Path) -> list[LabelledSample]:
    """Distinct knees plus one duplicate of every kind."""
    out: list[LabelledSample] = []

    def add(
        name: str,
        label: str,
        img: np.ndarray | None = None,
        copy_of: Path | None = None,
        group: str | None = None,
    ) -> Path:
        path = tmp_path / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if copy_of is not None:
            shutil.copy(copy_of, path)
        else:
            write_png(path, img, bits=8)
        out.append(LabelledSample(path=path, label=label, group=group))
        return path

    base = [_knee(s, 1.0 if s % 2 else 0.4) for s in range(6)]
    p0 = add("k0.png", "normal", base[0])
    add("k0_copy.png", "normal", copy_of=p0)  # 1: byte copy, same label
    p1 = add("k1.png", "osteoporosis", base[1])
    # 2: same pixels re-encoded (maximum PNG compression, different bytes)
    u8 = np.rint(base[1] * 255).astype(np.uint8)
    re_path = tmp_path / "osteoporosis" / "k1_reencoded.png"
    cv2.imwrite(str(re_path), u8, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert re_path.read_bytes() != p1.read_bytes()
    out.append(LabelledSample(path=re_path, label="osteoporosis"))
    # 3: near duplicate: noisy and resized
    rng = np.random.default_rng(0)
    noisy = np.clip(base[2] + rng.normal(0, 0.02, base[2].shape), 0, 1).astype(np.float32)
    add("k2.png", "osteopenia", base[2])
    add("k2_near.png", "osteopenia", cv2.resize(noisy, (80, 80), interpolation=cv2.INTER_AREA))
    # 4: conflicting: the same file under two classes
    p3 = add("k3.png", "normal", base[3])
    add("k3_conflict.png", "osteoporosis", copy_of=p3)
    # distinct images, one pair sharing an explicit patient group
    add("k4.png", "normal", base[4], group="patient-A")
    add("k5.png", "osteopenia", base[5], group="patient-A")
    return out


def _names(samples: list[LabelledSample], groups: list[list[int]]) -> list[list[str]]:
    return [sorted(samples[i].path.name for i in g) for g in groups]


def test_every_kind_is_found_and_conflicts_dropped(corpus: list[LabelledSample]) -> None:
    res = find_duplicates(corpus, fingerprint_files(corpus))
    assert sorted(_names(corpus, res.groups)) == [
        ["k0.png", "k0_copy.png"],
        ["k1.png", "k1_reencoded.png"],
        ["k2.png", "k2_near.png"],
        ["k3.png", "k3_conflict.png"],
    ]
    assert res.n_duplicate_groups == 4
    assert res.n_conflicting_groups == 1
    assert _names(corpus, res.conflicting) == [["k3.png", "k3_conflict.png"]]
    assert [corpus[i].path.name for i in res.dropped] == ["k3.png", "k3_conflict.png"]
    kinds = {(corpus[i].path.name, corpus[j].path.name): k for i, j, k in res.pairs}
    assert kinds[("k0.png", "k0_copy.png")] == "bytes"
    assert kinds[("k1.png", "k1_reencoded.png")] == "pixels"
    assert kinds[("k2.png", "k2_near.png")] == "near"
    assert res.kind_counts == {"bytes": 2, "pixels": 3, "near": 4}
    summary = res.summary(corpus)
    assert summary["n_duplicate_groups"] == 4 and summary["n_dropped"] == 2
    assert summary["conflicting_groups"] == [["normal/k3.png", "osteoporosis/k3_conflict.png"]]


def test_group_of_joins_duplicates_and_explicit_groups(corpus: list[LabelledSample]) -> None:
    res = find_duplicates(corpus, fingerprint_files(corpus))
    g = {s.path.name: res.group_of[i] for i, s in enumerate(corpus)}
    assert g["k0.png"] == g["k0_copy.png"] and g["k2.png"] == g["k2_near.png"]
    assert g["k4.png"] == g["k5.png"]  # same patient
    assert len({g["k0.png"], g["k1.png"], g["k2.png"], g["k3.png"], g["k4.png"]}) == 5


def test_images_as_arrays_and_missing_images(corpus: list[LabelledSample]) -> None:
    arrays = {s.path: cv2.imread(str(s.path), 0).astype(np.float32) / 255 for s in corpus}
    arrays[corpus[2].path] = None  # an unreadable file still takes part in the byte test
    res = find_duplicates(corpus, arrays)
    assert ["k0.png", "k0_copy.png"] in _names(corpus, res.groups)
    assert ["k1.png", "k1_reencoded.png"] not in _names(corpus, res.groups)


def test_distinct_similar_radiographs_are_not_merged() -> None:
    # Different synthetic knees share global anatomy: the pixel check must keep them apart.
    fps = [fingerprint(_knee(s, d)) for s in range(8) for d in (0.4, 1.0)]
    for i in range(len(fps)):
        for j in range(i + 1, len(fps)):
            corr, mae = verify_near(fps[i].small, fps[j].small)
            assert not (corr >= 0.98 and mae <= 0.03), (i, j, corr, mae)


def test_fingerprint_pixel_hash_ignores_bit_depth(tmp_path: Path) -> None:
    img = _knee(3)
    a = write_png(tmp_path / "a.png", img, bits=8)
    u8 = cv2.imread(str(a), cv2.IMREAD_UNCHANGED)
    b = tmp_path / "b.png"
    cv2.imwrite(str(b), u8.astype(np.uint16) * 257)  # same pixels at 16 bits
    fa = fingerprint(u8.astype(np.float32) / 255)
    fb = fingerprint(cv2.imread(str(b), cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535)
    assert fa.pixel_hash == fb.pixel_hash and fa.phash == fb.phash


@pytest.mark.skipif(not KNEE.is_dir(), reason="knee-xray data not present")
def test_knee_xray_duplicates() -> None:
    t0 = time.perf_counter()
    samples, _ = load_labelled(KNEE)
    res = find_duplicates(samples, fingerprint_files(samples))
    assert res.kind_counts["bytes"] >= 21
    assert res.n_duplicate_groups >= 21
    assert res.n_conflicting_groups >= 7
    names = {tuple(g) for g in _names(samples, res.conflicting)}
    assert ("N1.jpg", "OP13.jpg") in names
    assert ("OP53.jpg", "OS8.jpg", "OS9.jpg") in names
    assert len(res.dropped) == sum(len(g) for g in res.conflicting)
    assert time.perf_counter() - t0 < 30
