"""PNG / JPEG / TIFF reading: full depth, colour → grey, EXIF orientation, broken files."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
from PIL import Image

from osteoscan.frames import ReadLimits
from osteoscan.readers import read_frames
from osteoscan.testing.synthetic import synthetic_knee, write_png


def _knee() -> np.ndarray:
    return synthetic_knee(48, seed=7)


def test_png_16_and_8_bit_full_depth(tmp_path) -> None:
    img = _knee()
    fr16 = read_frames(write_png(tmp_path / "a.png", img, 16))[0]
    fr8 = read_frames(write_png(tmp_path / "b.png", img, 8))[0]
    assert fr16.status == fr8.status == "ok" and fr16.kind == "png"
    assert fr16.info["bits_stored"] == 16 and fr8.info["bits_stored"] == 8
    np.testing.assert_allclose(fr16.image, img, atol=0.5 / 65535 + 1e-6)
    np.testing.assert_allclose(fr8.image, img, atol=0.5 / 255 + 1e-6)
    # 16-bit keeps distinctions that 8 bits lose.
    assert len(np.unique(fr16.image)) > len(np.unique(fr8.image))


def test_image_id_is_content_hash(tmp_path) -> None:
    path = write_png(tmp_path / "a.png", _knee(), 8)
    fr = read_frames(path)[0]
    assert fr.image_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    assert fr.path == str(path) and fr.body_part == "unknown"


def test_rgb_jpeg_becomes_luminance(tmp_path) -> None:
    grey = (_knee() * 255).astype(np.uint8)
    bgr = np.dstack([grey, grey, grey])
    bgr[..., 2] = 255  # a red cast: luminance = .299*255 + .701*grey
    path = tmp_path / "c.png"
    cv2.imwrite(str(path), bgr)
    fr = read_frames(path)[0]
    expected = (0.299 * 255 + 0.701 * grey.astype(float)) / 255
    np.testing.assert_allclose(fr.image, expected, atol=1e-5)
    jpg = tmp_path / "d.jpg"
    cv2.imwrite(str(jpg), np.dstack([grey] * 3), [cv2.IMWRITE_JPEG_QUALITY, 95])
    frj = read_frames(jpg)[0]
    assert frj.kind == "jpeg" and frj.status == "ok"
    assert float(np.abs(frj.image - grey / 255.0).mean()) < 0.02


def test_exif_orientation_honoured(tmp_path) -> None:
    arr = np.zeros((20, 40), np.uint8)
    arr[:, :10] = 255  # bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise to display upright
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=100)
    fr = read_frames(path)[0]
    assert fr.image.shape == (40, 20) and fr.info["exif_orientation"] == 6
    # After a clockwise turn the left band is at the top.
    assert fr.image[:10].mean() > 0.9 and fr.image[-10:].mean() < 0.1


def test_multipage_tiff_gives_frames(tmp_path) -> None:
    pages = [
        Image.fromarray((synthetic_knee(32, seed=s) * 65535).astype(np.uint16)) for s in (1, 2)
    ]
    path = tmp_path / "m.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    frames = read_frames(path)
    assert [f.frame for f in frames] == [0, 1] and frames[1].image_id.endswith(":1")
    np.testing.assert_allclose(frames[1].image, synthetic_knee(32, seed=2), atol=1e-4)


def test_broken_and_limits(tmp_path) -> None:
    good = write_png(tmp_path / "g.png", _knee(), 8)
    data = good.read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "z.png").write_bytes(b"")
    (tmp_path / "f.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    for name in ("t.png", "z.png", "f.jpg"):
        fr = read_frames(tmp_path / name)[0]
        assert fr.status == "error" and fr.reason, name
    fr = read_frames(good, limits=ReadLimits(max_pixels=100))[0]
    assert fr.status == "error" and "too large" in fr.reason
    header_only = read_frames(good, decode=False)[0]
    assert header_only.status == "ok" and header_only.image is None
    assert header_only.info["rows"] == 48
