"""Atomic writes: old file or complete new one, never a partial file or a stray temporary."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from osteoscan.atomic import (
    TEMP_NAME,
    AtomicFile,
    atomic_write,
    output_error,
    output_errors,
    write_bytes,
    write_text,
)
from osteoscan.errors import OutputError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_keeps_old_file_on_enospc(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_text("old complete results\n")

    def fill_disk(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match=r"results\.csv: the disk is full \(ENOSPC\).*intact"):
        atomic_write(target, fill_disk)
    assert target.read_text() == "old complete results\n"
    assert _names(tmp_path) == ["results.csv"]  # no temporary left
    atomic_write(target, lambda tmp: tmp.write_text("new\n"))
    assert target.read_text() == "new\n"
    assert _names(tmp_path) == ["results.csv"]


def test_published_files_are_readable_by_others(tmp_path: Path) -> None:
    target = write_text(tmp_path / "sub" / "card.md", "é\n")  # the folder is made as needed
    assert target.read_text(encoding="utf-8") == "é\n"
    assert target.stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600


def test_permission_denied_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="x.csv: permission denied"), output_errors("x.csv"):
        raise PermissionError(errno.EACCES, "Permission denied")
    if os.geteuid() != 0:  # root ignores folder permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputError, match="permission denied"):
            write_text(ro / "r.csv", "x")


def test_a_file_in_the_way_of_the_folder_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"is a file, not a folder|ENOTDIR|EEXIST"):
        write_bytes(blocker / "out" / "r.csv", b"x")


def test_unknown_errno_keeps_the_system_text() -> None:
    err = output_error("/a/r.h5", OSError(errno.EMFILE, "Too many open files"))
    assert "cannot write /a/r.h5: Too many open files (EMFILE)" in str(err)


def test_other_exceptions_pass_through_and_remove_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.csv"
    with pytest.raises(KeyError), AtomicFile(target) as f:
        f.open("w").write("partial")
        raise KeyError("bug")
    assert _names(tmp_path) == []


def test_streaming_writes_are_invisible_until_commit(tmp_path: Path) -> None:
    target = tmp_path / "r.csv"
    target.write_text("previous\n")
    f = AtomicFile(target)
    fh = f.open("w", encoding="utf-8")
    fh.write("row 1\n")
    assert target.read_text() == "previous\n"
    assert TEMP_NAME.match(f.tmp.name) and f.tmp.parent == tmp_path
    fh.write("row 2\n")  # left open: commit closes (flushes) it
    assert f.commit() == target
    assert target.read_text() == "row 1\nrow 2\n"
    assert _names(tmp_path) == ["r.csv"]
    f.abort()  # after commit: nothing to undo
    assert target.exists()


def test_abort_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "r.h5"
    target.write_bytes(b"old")
    f = AtomicFile(target)
    f.open("wb").write(b"new")
    f.abort()
    f.abort()
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["r.h5"]


def test_commit_under_a_name_chosen_after_writing(tmp_path: Path) -> None:
    f = AtomicFile(tmp_path / "member")
    f.tmp.write_bytes(b"weights")
    published = f.commit("member00-abcd.safetensors")
    assert published == tmp_path / "member00-abcd.safetensors"
    assert _names(tmp_path) == ["member00-abcd.safetensors"]


def test_failed_rename_is_an_output_error_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="ENOSPC"):
        write_bytes(tmp_path / "a.png", b"png")
    assert _names(tmp_path) == []


def test_temp_names_are_swept_and_published_names_are_not() -> None:
    assert TEMP_NAME.match(".results.csv.a1B2_c3D.tmp")
    assert not TEMP_NAME.match("results.csv")
    assert not TEMP_NAME.match(".results.csv")
    assert not TEMP_NAME.match("notes.tmp")


def test_real_full_tmpfs(tmp_path: Path) -> None:
    """A 64 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        target = write_text(mnt / "results.csv", "small\n")
        with pytest.raises(OutputError, match="ENOSPC"):
            write_bytes(target, b"x" * 200_000)
        assert target.read_text() == "small\n"
        assert _names(mnt) == ["results.csv"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
