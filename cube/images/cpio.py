"""A writer for the cpio "newc" archives the Linux kernel unpacks as its initramfs.

The kernel accepts only the ``newc`` (070701) format, uncompressed or compressed with an
algorithm it was built for (``CONFIG_RD_*``). Archives written here are reproducible: entries
are in the order given, owners are root, and every timestamp is the same fixed ``mtime``, so the
same tree always gives the same bytes (the image cache key depends on that).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

__all__ = ["CpioEntry", "entries_from_tree", "write_cpio"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_CHUNK = 1 << 20


class CpioEntry(msgspec.Struct, frozen=True):
    """One archive member: a directory, a regular file, a symlink or a device node.

    ``source`` is the host file whose bytes a regular file gets (``data`` when it is None);
    ``target`` is a symlink's destination; ``rdev`` is a device node's (major, minor).
    """

    name: str  # path inside the archive, without a leading "/"
    mode: int  # full st_mode: file type bits and permissions
    source: str | None = None
    data: bytes = b""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0


def _header(ino: int, entry: CpioEntry, size: int, mtime: int) -> bytes:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        mtime,
        size,
        0,
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,
    )
    header = _MAGIC + b"".join(b"%08X" % value for value in fields) + name
    return header + _padding(len(header))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _copy(path: str, out: BinaryIO) -> int:
    written = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            out.write(chunk)
            written += len(chunk)
    return written


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO, *, mtime: int = 0) -> int:
    """Write ``entries`` and the trailer to ``out`` as a newc archive; returns the entry count.

    Parent directories must come before their contents (``entries_from_tree`` does that).
    """
    count = 0
    for ino, entry in enumerate(entries, start=1):
        if stat.S_ISREG(entry.mode):
            size = os.path.getsize(entry.source) if entry.source else len(entry.data)
            out.write(_header(ino, entry, size, mtime))
            written = _copy(entry.source, out) if entry.source else out.write(entry.data)
            if written != size:
                raise OSError(f"{entry.source} changed size while being archived")
            out.write(_padding(size))
        elif stat.S_ISLNK(entry.mode):
            target = entry.target.encode()
            out.write(_header(ino, entry, len(target), mtime))
            out.write(target + _padding(len(target)))
        else:
            out.write(_header(ino, entry, 0, mtime))
        count += 1
    out.write(_header(0, CpioEntry(_TRAILER, 0), 0, 0))
    return count


def entries_from_tree(root: Path) -> Iterator[CpioEntry]:
    """Every directory, file and symlink under ``root``, parents first, in sorted order.

    Permissions are kept; owners and times are not (the caller sets owners: ``uid``/``gid``).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = base / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                yield CpioEntry(rel, stat.S_IFLNK | 0o777, target=os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                yield CpioEntry(rel, info.st_mode)
            elif stat.S_ISREG(info.st_mode):
                yield CpioEntry(rel, info.st_mode, source=str(path))
