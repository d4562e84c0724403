"""Find the image files under the paths a user gives, and tell what each one is.

Files are recognised by *content*, never by extension alone: PACS exports often have no extension
at all, and a file named ``.dcm`` may hold an HTML error page. :func:`sniff` reads the first bytes:

- DICOM Part 10: 128-byte preamble + ``DICM``; preamble-less DICOM (older exports write the
  dataset straight away): the file starts with a group 0x0002 or 0x0008 element tag in little
  endian, followed by a valid explicit VR and length, or a sane implicit VR length.
- PNG, JPEG, TIFF (classic and BigTIFF) and JPEG 2000 (JP2 box or raw J2K codestream) by signature.
- DICOMDIR (media storage directory: an index, not an image) is ``ignored``.

Kinds: ``dicom``, ``png``, ``jpeg``, ``tiff``, ``jpeg2000`` (see :data:`IMAGE_KINDS`), ``broken``
(should become an error row: zero bytes, or named like an image but not one) and ``ignored`` (not
an image: README.txt, DICOMDIR, unreadable folders, vanished files — never a row).

:func:`discover` walks folders recursively in a deterministic (name-sorted, depth-first) order,
follows symbolic links with loop detection, and turns every problem into a :class:`Found` with a
reason instead of an exception, so one bad folder never stops a night's batch.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_KINDS: tuple[str, ...] = ("dicom", "png", "jpeg", "tiff", "jpeg2000")

# Extensions that claim an image: such a file whose content is no image is "broken" (an error row
# a person should look at), not silently ignored.
_CLAIMED: dict[str, str] = {
    ".dcm": "DICOM",
    ".dicom": "DICOM",
    ".dic": "DICOM",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".j2k": "JPEG 2000",
    ".jp2": "JPEG 2000",
}

_DICOMDIR_UID = b"1.2.840.10008.1.3.10"
_HEAD_BYTES = 4096

# Explicit VR codes; the second set carries 2 reserved bytes and a 4-byte length.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Found:
    """One thing :func:`discover` came across.

    ``path`` is ``root / <relative path>`` as given (not resolved); ``root`` is the folder the walk
    started from (for a file given directly, its parent folder). ``kind`` is one of
    :data:`IMAGE_KINDS`, ``"broken"`` or ``"ignored"`` (``reason`` says why), or
    :data:`UNCHECKED` when the caller said the file is unchanged since it was last read (its
    content is then not opened: a nightly walk costs one ``stat`` per unchanged file).
    """

    path: Path
    root: Path
    kind: str
    reason: str = ""
    # (size, mtime_ns) from the walk's own stat: planning needs no second stat
    signature: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def relpath(self) -> str:
        """Path relative to :attr:`root`, with forward slashes."""
        try:
            return self.path.relative_to(self.root).as_posix()
        except ValueError:
            return self.path.name


def _is_dicomdir(head: bytes) -> bool:
    """True when the Part 10 file meta group says Media Storage Directory (a DICOMDIR)."""
    pos = 132
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            pos += 8
        if elem == 0x0002:
            value = head[pos : pos + length].rstrip(b"\x00 ")
            return value == _DICOMDIR_UID
        if length == _UNDEFINED:
            break
        pos += length
    return False


def _looks_preambleless_dicom(head: bytes, size: int) -> bool:
    """True when the file starts like a DICOM data set written without preamble and ``DICM``.

    Little endian (explicit or implicit VR) and explicit VR big endian, which old exports and
    pydicom's own ``ExplVR_BigEndNoMeta.dcm`` use.
    """
    if len(head) < 8:
        return False
    return any(_first_element_fits(head, size, order) for order in ("<", ">"))


def _first_element_fits(head: bytes, size: int, order: str) -> bool:
    group, _elem = struct.unpack_from(f"{order}HH", head, 0)
    if group not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr in _VRS:  # explicit VR
        if vr in _LONG_VRS:
            if len(head) < 12 or head[6:8] != b"\x00\x00":
                return False
            (length,) = struct.unpack_from(f"{order}I", head, 8)
            return length == _UNDEFINED or 12 + length <= size
        (length,) = struct.unpack_from(f"{order}H", head, 6)
        return 8 + length <= size
    if order == ">":
        return False  # implicit VR is always little endian
    # implicit VR little endian: a 4-byte length that fits in the file (or undefined, for SQ)
    (length,) = struct.unpack_from("<I", head, 4)
    return length == _UNDEFINED or 8 + length <= size


def _content_kind(head: bytes, size: int) -> str | None:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicomdir" if _is_dicomdir(head) else "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if _looks_preambleless_dicom(head, size):
        return "dicom"
    return None


def _describe(head: bytes) -> str:
    """A few words on what a non-image file starts with, for error reasons."""
    sample = head[:512]
    stripped = sample.lstrip()
    if stripped[:1] == b"<":
        return "starts with text (HTML/XML markup)"
    # Tolerant decode: a 512-byte sample may cut a multi-byte character in two.
    text = sample.decode("utf-8", errors="replace")
    printable = sum(c.isprintable() and c != "\ufffd" or c in "\r\n\t" for c in text)
    if printable >= 0.95 * len(text):
        return "starts with text"
    if sample.startswith(b"PK\x03\x04"):
        return "is a ZIP archive"
    if sample.startswith(b"\x1f\x8b"):
        return "is gzip-compressed"
    if sample.startswith(b"%PDF"):
        return "is a PDF document"
    return "starts with bytes " + sample[:8].hex(" ")


def sniff(path: str | Path) -> tuple[str, str]:
    """Tell what a file is from its first bytes: ``(kind, reason)``.

    ``kind`` is one of :data:`IMAGE_KINDS` (reason empty), ``"broken"`` (zero bytes, unreadable,
    or named like an image but not one) or ``"ignored"`` (not an image, DICOMDIR, vanished).
    Never raises for a bad file.
    """
    path = Path(path)
    claimed = _CLAIMED.get(path.suffix.lower())
    if path.name.upper() == "DICOMDIR":
        return "ignored", "DICOMDIR index file"
    try:
        # stat first: opening a FIFO or a device given by mistake would block or never end
        if not stat.S_ISREG(os.stat(path).st_mode):
            if os.path.isdir(path):
                return "ignored", "is a folder"
            return "ignored", "not a regular file (device, FIFO or socket)"
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(_HEAD_BYTES)
    except FileNotFoundError:
        if os.path.islink(path):
            reason = f"broken symbolic link (target {os.readlink(path)} missing)"
            return ("broken" if claimed else "ignored"), reason
        return "ignored", "vanished before it could be read (no such file)"
    except OSError as exc:
        reason = f"cannot read file: {exc.strerror or exc}"
        return ("broken" if claimed else "ignored"), reason
    if size == 0 or not head:
        return "broken", "empty file (0 bytes)"
    kind = _content_kind(head, size)
    if kind == "dicomdir":
        return "ignored", "DICOMDIR index file"
    if kind is not None:
        return kind, ""
    if claimed:
        return "broken", f"named {path.suffix} but is not {claimed}: {_describe(head)}"
    return "ignored", "not an image file"


def _matches(patterns: Sequence[str], rel: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _strerror(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)


UNCHECKED = "unchecked"
# unchanged(path, size, mtime_ns) -> True when the caller already knows this file as it is now
Unchanged = Callable[[str, int, int], bool]


class _Walker:
    """State of one :func:`discover` call: directories and files already seen (by device/inode)."""

    def __init__(
        self, include: Sequence[str], exclude: Sequence[str], unchanged: Unchanged | None = None
    ) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.unchanged = unchanged
        self.seen_dirs: dict[tuple[int, int], Path] = {}
        self.seen_files: dict[tuple[int, int], Path] = {}

    def wanted(self, rel: str, name: str) -> bool:
        if self.exclude and _matches(self.exclude, rel, name):
            return False
        return not self.include or _matches(self.include, rel, name)

    def file(self, path: Path, root: Path, st: os.stat_result | None) -> Found:
        if st is not None:
            key = (st.st_dev, st.st_ino)
            first = self.seen_files.get(key)
            if first is not None:
                return Found(path, root, "ignored", f"same file as {first} (already listed)")
            self.seen_files[key] = path
            sig = (st.st_size, st.st_mtime_ns)
            if self.unchanged is not None and self.unchanged(str(path), *sig):
                return Found(path, root, UNCHECKED, "", sig)
            return Found(path, root, *sniff(path), sig)
        kind, reason = sniff(path)
        return Found(path, root, kind, reason)

    def tree(self, root: Path) -> Iterator[Found]:
        """Depth-first, name-sorted walk; an explicit stack keeps very deep trees safe."""
        st = os.stat(root)
        self.seen_dirs[(st.st_dev, st.st_ino)] = root
        # Each stack entry: (folder path, relative path, sorted entries, next index, ancestors).
        stack: list[tuple[Path, str, list[os.DirEntry[str]], list[int], frozenset]] = []
        entries = self._list(root, root)
        if isinstance(entries, Found):
            yield entries
            return
        stack.append((root, "", entries, [0], frozenset({(st.st_dev, st.st_ino)})))
        while stack:
            folder, rel_dir, entries, index, ancestors = stack[-1]
            if index[0] >= len(entries):
                stack.pop()
                continue
            entry = entries[index[0]]
            index[0] += 1
            path = folder / entry.name
            rel = f"{rel_dir}{entry.name}"
            try:
                est = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                if entry.is_symlink():
                    if self.wanted(rel, entry.name):
                        yield self.file(path, root, None)
                elif self.wanted(rel, entry.name):
                    yield Found(path, root, "ignored", "vanished during the walk (no such file)")
                continue
            except OSError as exc:
                if self.wanted(rel, entry.name):
                    yield Found(path, root, "ignored", f"cannot stat: {_strerror(exc)}")
                continue
            if stat.S_ISDIR(est.st_mode):
                if self.exclude and _matches(self.exclude, rel, entry.name):
                    continue  # an excluded folder is pruned whole
                key = (est.st_dev, est.st_ino)
                if key in ancestors:
                    yield Found(path, root, "ignored", "symbolic link loop (points to a parent)")
                    continue
                if key in self.seen_dirs:
                    yield Found(
                        path, root, "ignored", f"folder already walked as {self.seen_dirs[key]}"
                    )
                    continue
                self.seen_dirs[key] = path
                sub = self._list(path, root)
                if isinstance(sub, Found):
                    yield sub
                    continue
                stack.append((path, rel + "/", sub, [0], ancestors | {key}))
            elif stat.S_ISREG(est.st_mode):
                if self.wanted(rel, entry.name):
                    yield self.file(path, root, est)
            elif self.wanted(rel, entry.name):
                yield Found(path, root, "ignored", "not a regular file (device, FIFO or socket)")

    @staticmethod
    def _list(folder: Path, root: Path) -> list[os.DirEntry[str]] | Found:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            return Found(folder, root, "ignored", "folder vanished during the walk")
        except OSError as exc:
            return Found(folder, root, "ignored", f"cannot read folder: {_strerror(exc)}")


def discover(
    paths: Sequence[str | Path],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    unchanged: Unchanged | None = None,
) -> Iterator[Found]:
    """Walk ``paths`` (files or folders) and yield one :class:`Found` per file met.

    Folders are walked recursively in name order; paths are handled in the order given. Symbolic
    links are followed; loops and folders reached twice are reported once as ``ignored``, so is a
    file reached twice. ``include``/``exclude`` are :mod:`fnmatch` globs matched against the path
    relative to its root and against the file name; exclude wins, and an excluded folder is not
    entered. Unreadable folders, vanished files and missing paths become ``ignored`` entries with
    a reason: nothing here raises for a bad file or folder. ``unchanged(path, size, mtime_ns)``
    lets a caller with a memory of earlier walks skip reading files it already knows
    (:data:`UNCHECKED`; :func:`recheck` reads one later if needed).
    """
    walker = _Walker(include, exclude, unchanged)
    for given in paths:
        path = Path(given)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                yield walker.file(path, path.parent, None)
            else:
                yield Found(path, path.parent, "ignored", "no such file or folder")
            continue
        except OSError as exc:
            yield Found(path, path.parent, "ignored", f"cannot stat: {_strerror(exc)}")
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in walker.seen_dirs:
                reason = f"folder already walked as {walker.seen_dirs[key]}"
                yield Found(path, path, "ignored", reason)
                continue
            yield from walker.tree(path)
        elif walker.wanted(path.name, path.name):
            yield walker.file(path, path.parent, st)


def recheck(found: Found) -> Found:
    """A :data:`UNCHECKED` entry with its content kind read now (other entries unchanged)."""
    if found.kind != UNCHECKED:
        return found
    return Found(found.path, found.root, *sniff(found.path), found.signature)
