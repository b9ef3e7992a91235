"""The "newc" cpio format, which the kernel unpacks as an initramfs: enough of it to write one
from a tree of entries (no device nodes: the guest mounts devtmpfs)."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["Entry", "write"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file of the archive: a directory, a regular file (`data`), or a symbolic link
    (`data` its target). `name` is relative, without a leading slash."""

    name: str
    mode: int
    data: bytes = b""


def write(entries: Iterable[Entry], out: BinaryIO) -> None:
    """The archive of `entries`, in order (a directory before what it holds), owned by root,
    with its trailer."""
    for inode, entry in enumerate(entries, start=1):
        kind = stat.S_IFMT(entry.mode)
        if kind not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
            raise ValueError(f"{entry.name}: only directories, files and links")
        name = entry.name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"invalid name {entry.name!r}")
        _record(out, name, entry.mode, entry.data if kind != stat.S_IFDIR else b"", inode)
    _record(out, _TRAILER, 0, b"", 0)


def _record(out: BinaryIO, name: str, mode: int, data: bytes, inode: int) -> None:
    encoded = name.encode() + b"\0"
    links = 2 if stat.S_ISDIR(mode) else 1
    # inode, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    # rdevminor, namesize, check: eight hex digits each.
    fields = (inode, mode, 0, 0, links, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header + encoded + _pad(len(header) + len(encoded)))
    out.write(data + _pad(len(data)))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
