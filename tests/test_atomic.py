"""Atomic writes: old file or complete new one, never a partial file or a stray temporary."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from osteoscan.atomic import (
    TEMP_NAME,
    AtomicFile,
    atomic_write,
    output_error,
    output_errors,
    refuse_symlink,
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


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """``umask(0o077)`` sets the process umask for the test; the old one comes back after."""
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def test_published_files_are_readable_by_others(tmp_path: Path, umask) -> None:
    umask(0o022)
    target = write_text(tmp_path / "sub" / "card.md", "é\n")  # the folder is made as needed
    assert target.read_text(encoding="utf-8") == "é\n"
    assert target.stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600


def test_permissions_are_never_wider_than_the_umask(tmp_path: Path, umask) -> None:
    umask(0o077)
    for target in (write_bytes(tmp_path / "a.png", b"x"), atomic_write(tmp_path / "b.h5", _touch)):
        assert target.stat().st_mode & 0o777 == 0o600
    with AtomicFile(tmp_path / "c.csv") as f:
        assert f.tmp.stat().st_mode & 0o777 == 0o600  # the temporary too, from its creation
        f.open("w").write("x")


def _touch(tmp: Path) -> None:
    tmp.write_bytes(b"data")


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    for name, write in (("results.csv", write_text), ("map.png", write_bytes)):
        (out / name).symlink_to(outside)
        write(out / name, "new" if write is write_text else b"new")  # type: ignore[operator]
        assert not (out / name).is_symlink() and (out / name).read_bytes() == b"new"
    assert outside.read_text() == "precious\n"
    dangling = out / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere" / "x.csv")  # would create a file elsewhere
    write_text(dangling, "x")
    assert not dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_symlink_planted_at_the_temporary_name_is_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can guess the next temporary name plants a link there: it is skipped."""
    import osteoscan.atomic as atomic

    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    planted = out / ".results.csv.AAAAAAAA.tmp"
    planted.symlink_to(outside)
    picks = iter("A" * 8)  # the first name drawn is the planted one; then random names
    real = atomic.secrets.choice
    monkeypatch.setattr(atomic.secrets, "choice", lambda seq: next(picks, None) or real(seq))
    target = write_text(out / "results.csv", "new\n")
    assert target.read_text() == "new\n" and outside.read_text() == "precious\n"
    assert planted.is_symlink()  # left alone, not written through


def test_a_temporary_swapped_for_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    f = AtomicFile(tmp_path / "out" / "results.csv")
    f.tmp.unlink()
    f.tmp.symlink_to(outside)  # a race won by someone with write access to the folder
    with pytest.raises(OutputError, match="results.csv"):
        f.open("w")
    with pytest.raises(OutputError):
        f.commit()
    assert outside.read_text() == "precious\n"
    assert not (tmp_path / "out" / "results.csv").exists()


def test_refuse_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    refuse_symlink(tmp_path / "real")
    refuse_symlink(tmp_path / "absent")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    for name in ("link", "dangling"):
        with pytest.raises(OutputError, match="symbolic link"):
            refuse_symlink(tmp_path / name, "scan state file")


def test_very_long_target_names_get_legal_temporaries(tmp_path: Path) -> None:
    target = write_text(tmp_path / ("n" * 250 + ".csv"), "x")
    assert target.read_text() == "x" and _names(tmp_path) == [target.name]


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
