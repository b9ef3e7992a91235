"""The guest kernel: the uncompressed ELF image (`vmlinux`) inside a Debian kernel package's
compressed `vmlinuz`, which QEMU's microvm boots directly (PVH), without the bzImage's
self-decompression (seconds under software emulation).

Debian compresses its kernels with xz (the generic flavour) or LZ4 (the cloud one). The
payload is found by its format's magic number and decompressed: xz and gzip in-process, LZ4
(the kernel's legacy frame format) and zstd by their Debian tools, which stop at the end of
the frame and ignore the trailer after it.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import zlib

__all__ = ["KernelError", "vmlinux"]

_ELF = b"\x7fELF"
# (format, magic): tried in this order.
_FORMATS = (
    ("xz", b"\xfd7zXZ\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
)


class KernelError(ValueError):
    pass


def vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside `bzimage` (a bzImage, or already an ELF)."""
    if bzimage.startswith(_ELF):
        return bzimage
    for name, magic in _FORMATS:
        at = bzimage.find(magic)
        while at >= 0:
            try:
                found = _decompress(name, bzimage[at:])
            except (KernelError, lzma.LZMAError, zlib.error, OSError, EOFError):
                found = b""
            if found.startswith(_ELF):
                return found
            at = bzimage.find(magic, at + 1)
    raise KernelError("no ELF kernel in any compressed payload this image holds")


def _decompress(name: str, data: bytes) -> bytes:
    if name == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if name == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    tool = shutil.which(name)
    if tool is None:
        raise KernelError(f"decompressing a {name} kernel needs `{name}` (Debian package {name})")
    done = subprocess.run([tool, "-dc"], input=data, capture_output=True, timeout=120, check=False)
    # Both stop at the end of their frame and complain of the bytes after it: what came out
    # before is the kernel.
    return done.stdout
