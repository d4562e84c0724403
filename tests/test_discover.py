"""Tests for file discovery: content sniffing and the recursive walk."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    generate_uid,
)

from osteoscan import discover as discover_mod
from osteoscan.discover import IMAGE_KINDS, Found, discover, sniff


def _dataset(explicit: bool = True) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_dicom(path: Path, *, preamble: bool = True, meta: bool = True, explicit=True) -> Path:
    """A tiny DICOM file, optionally without preamble and/or without file meta."""
    ds = _dataset(explicit)
    if preamble:
        ds.preamble = b"\x00" * 128
        ds.save_as(path, enforce_file_format=True)
        return path
    ds.preamble = None
    if not meta:
        del ds.file_meta
        ds.save_as(path, enforce_file_format=False, implicit_vr=not explicit, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=False)
    return path


def write_dicomdir_like(path: Path) -> Path:
    """A Part 10 file whose meta says Media Storage Directory (what a DICOMDIR is)."""
    ds = pydicom.Dataset()
    ds.FileSetID = "TEST"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=True)
    return path


# --- sniff -------------------------------------------------------------------------------------


def test_sniff_dicom_with_preamble(tmp_path: Path) -> None:
    assert sniff(write_dicom(tmp_path / "a.dcm")) == ("dicom", "")


@pytest.mark.parametrize(
    ("meta", "explicit"), [(True, True), (False, True), (False, False)], ids=["meta", "ex", "im"]
)
def test_sniff_dicom_without_preamble(tmp_path: Path, meta: bool, explicit: bool) -> None:
    path = write_dicom(tmp_path / "IM0001", preamble=False, meta=meta, explicit=explicit)
    assert path.read_bytes()[128:132] != b"DICM"
    assert sniff(path) == ("dicom", "")
    # pydicom agrees it is DICOM: the sniffer must not invent files the reader cannot open
    assert pydicom.dcmread(path, force=True).Modality == "DX"


def test_sniff_raster_signatures(tmp_path: Path) -> None:
    img8 = np.zeros((64, 64), np.uint8)
    for name, kind in [("a.png", "png"), ("a.jpg", "jpeg"), ("a.tif", "tiff"), ("a.jp2", None)]:
        path = tmp_path / name
        if not cv2.imwrite(str(path), img8):
            continue  # JPEG 2000 writer missing in this OpenCV build
        # sniffing must not depend on the extension: copy without it
        bare = tmp_path / f"noext_{name.replace('.', '_')}"
        bare.write_bytes(path.read_bytes())
        expected = kind or "jpeg2000"
        assert sniff(path) == (expected, "")
        assert sniff(bare) == (expected, "")
    assert set(IMAGE_KINDS) >= {"dicom", "png", "jpeg", "tiff", "jpeg2000"}


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"MM\x00*" + b"\x00" * 20, "tiff"),
        (b"II+\x00" + b"\x00" * 20, "tiff"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 20, "jpeg2000"),
        (b"\xff\x4f\xff\x51" + b"\x00" * 20, "jpeg2000"),
    ],
)
def test_sniff_other_magic(tmp_path: Path, head: bytes, kind: str) -> None:
    path = tmp_path / "blob"
    path.write_bytes(head)
    assert sniff(path) == (kind, "")


def test_sniff_text_named_dcm_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_text("this is not a DICOM file\n")
    kind, reason = sniff(path)
    assert kind == "broken"
    assert reason == "named .dcm but is not DICOM: starts with text"


def test_sniff_html_named_png_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "scan.PNG"
    path.write_text("<html><body>404</body></html>")
    kind, reason = sniff(path)
    assert kind == "broken"
    assert "not PNG" in reason and "HTML" in reason


def test_sniff_binary_junk_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "a.jpeg"
    path.write_bytes(bytes(range(200, 256)) * 4)
    kind, reason = sniff(path)
    assert kind == "broken" and "starts with bytes c8 c9" in reason


def test_sniff_zero_bytes(tmp_path: Path) -> None:
    for name in ("empty.dcm", "empty"):
        path = tmp_path / name
        path.touch()
        assert sniff(path) == ("broken", "empty file (0 bytes)")


def test_sniff_plain_text_ignored(tmp_path: Path) -> None:
    path = tmp_path / "README.txt"
    path.write_text("hello")
    assert sniff(path) == ("ignored", "not an image file")


def test_sniff_dicomdir(tmp_path: Path) -> None:
    by_content = write_dicomdir_like(tmp_path / "index.dcm")
    assert sniff(by_content) == ("ignored", "DICOMDIR index file")
    by_name = tmp_path / "DICOMDIR"
    by_name.write_bytes(b"anything")
    assert sniff(by_name) == ("ignored", "DICOMDIR index file")


def test_sniff_pydicom_dicomdir() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("DICOMDIR", download=False)
    if path is None:
        pytest.skip("pydicom's DICOMDIR test file is not installed")
    assert sniff(path)[0] == "ignored"


def test_sniff_vanished(tmp_path: Path) -> None:
    assert sniff(tmp_path / "gone.dcm") == (
        "ignored",
        "vanished before it could be read (no such file)",
    )


def test_sniff_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    assert sniff(fifo) == ("ignored", "not a regular file (device, FIFO or socket)")
    (found,) = list(discover([fifo]))
    assert found.kind == "ignored"
    assert sniff(tmp_path) == ("ignored", "is a folder")


def test_sniff_truncated_dicom_is_still_dicom(tmp_path: Path) -> None:
    # truncation is the reader's to report (with an error row); the sniffer sees a DICOM header
    full = write_dicom(tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(full[:140])
    assert sniff(path) == ("dicom", "")


def test_sniff_short_file_with_dicom_group_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\x08\x00\x05\x00\xff\xff\xff\x7f")  # implicit length far beyond the file
    assert sniff(path)[0] == "ignored"


# --- discover ----------------------------------------------------------------------------------


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    write_dicom(root / "b" / "deep" / "IM0001")
    write_dicom(root / "a" / "z.dcm")
    cv2.imwrite(str(root / "a" / "k.png"), np.zeros((4, 4), np.uint8))
    (root / "README.txt").write_text("notes")
    (root / "x.dcm").write_text("not dicom")
    (root / "zero.dcm").touch()
    return root


def _rels(found: list[Found]) -> list[str]:
    return [f.relpath for f in found]


def test_discover_recursive_sorted_and_kinds(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    found = list(discover([root]))
    assert _rels(found) == [
        "README.txt",
        "a/k.png",
        "a/z.dcm",
        "b/deep/IM0001",
        "x.dcm",
        "zero.dcm",
    ]
    kinds = {f.relpath: f.kind for f in found}
    assert kinds == {
        "README.txt": "ignored",
        "a/k.png": "png",
        "a/z.dcm": "dicom",
        "b/deep/IM0001": "dicom",
        "x.dcm": "broken",
        "zero.dcm": "broken",
    }
    assert all(f.root == root and f.path == root / f.relpath for f in found)
    # deterministic: the same walk twice gives the same list
    assert list(discover([root])) == found


def test_discover_file_given_directly(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    target = root / "a" / "z.dcm"
    (found,) = list(discover([target]))
    assert found == Found(target, root / "a", "dicom", "")


def test_discover_keeps_argument_order_and_lists_each_file_once(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    found = list(discover([root / "b", root / "a" / "k.png", root / "b" / "deep"]))
    assert [f.path.name for f in found] == ["IM0001", "k.png", "deep"]
    assert found[2].kind == "ignored" and "already walked" in found[2].reason


def test_discover_missing_path_reported(tmp_path: Path) -> None:
    (found,) = list(discover([tmp_path / "nope"]))
    assert found.kind == "ignored" and found.reason == "no such file or folder"


def test_discover_include_exclude(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert _rels(discover([root], include=["*.dcm"])) == ["a/z.dcm", "x.dcm", "zero.dcm"]
    assert _rels(discover([root], include=["a/*"])) == ["a/k.png", "a/z.dcm"]
    # exclude wins over include, and matches the file name or the relative path
    assert _rels(discover([root], include=["*.dcm"], exclude=["zero.*", "a/*"])) == ["x.dcm"]
    # an excluded folder is not entered
    assert _rels(discover([root], exclude=["b"])) == [
        "README.txt",
        "a/k.png",
        "a/z.dcm",
        "x.dcm",
        "zero.dcm",
    ]


def test_discover_symlink_loop_is_reported_not_fatal(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "b" / "deep" / "loop").symlink_to(root / "b")
    (root / "a" / "self").symlink_to(".")
    found = list(discover([root]))
    loops = [f for f in found if "loop" in f.reason]
    assert sorted(f.relpath for f in loops) == ["a/self", "b/deep/loop"]
    assert all(f.kind == "ignored" for f in loops)
    # the real files are still listed exactly once
    assert _rels([f for f in found if f.kind == "dicom"]) == ["a/z.dcm", "b/deep/IM0001"]


def test_discover_follows_symlinked_folders_and_files(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    write_dicom(outside / "ext.dcm")
    (root / "c_link").symlink_to(outside)
    (root / "a" / "dangling.dcm").symlink_to(tmp_path / "missing.dcm")
    found = {f.relpath: f for f in discover([root])}
    assert found["c_link/ext.dcm"].kind == "dicom"
    assert found["a/dangling.dcm"].kind == "broken"
    assert "broken symbolic link" in found["a/dangling.dcm"].reason


def test_discover_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path)
    real_scandir = os.scandir

    def scandir(path):  # root can read everything, so simulate what a normal user meets
        if Path(path) == root / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(discover_mod.os, "scandir", scandir)
    found = list(discover([root]))
    (bad,) = [f for f in found if f.relpath == "b"]
    assert bad.kind == "ignored" and bad.reason == "cannot read folder: Permission denied"
    assert "a/z.dcm" in _rels(found) and "zero.dcm" in _rels(found)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_discover_unreadable_folder_for_real(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "b").chmod(0)
    try:
        found = list(discover([root]))
    finally:
        (root / "b").chmod(0o755)
    (bad,) = [f for f in found if f.relpath == "b"]
    assert bad.kind == "ignored" and "Permission denied" in bad.reason


def test_discover_vanished_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path)
    real_scandir = os.scandir

    class _Vanishing:
        """Lists a file, which is then deleted before it is looked at."""

        def __init__(self, path):
            self._it = real_scandir(path)
            self._entries = list(self._it)

        def __enter__(self):
            for e in self._entries:
                if e.name == "z.dcm":
                    os.unlink(e.path)
            return iter(self._entries)

        def __exit__(self, *exc):
            self._it.close()

    def scandir(path):
        return _Vanishing(path) if Path(path) == root / "a" else real_scandir(path)

    monkeypatch.setattr(discover_mod.os, "scandir", scandir)
    found = {f.relpath: f for f in discover([root])}
    assert found["a/z.dcm"].kind == "ignored"
    assert "vanished" in found["a/z.dcm"].reason
    assert found["a/k.png"].kind == "png"


def test_discover_vanished_between_stat_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path)
    real_sniff = discover_mod.sniff

    def sniff_after_delete(path):
        if Path(path).name == "k.png":
            os.unlink(path)
        return real_sniff(path)

    monkeypatch.setattr(discover_mod, "sniff", sniff_after_delete)
    found = {f.relpath: f for f in discover([root])}
    assert found["a/k.png"].kind == "ignored" and "vanished" in found["a/k.png"].reason


def test_discover_dicomdir_skipped(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    write_dicomdir_like(root / "DICOMDIR")
    found = {f.relpath: f for f in discover([root])}
    assert found["DICOMDIR"].kind == "ignored"
    assert found["DICOMDIR"].reason == "DICOMDIR index file"
