"""The guest image's pieces that need no VM: the initramfs archive, read back by busybox's
own cpio, and the kernel found inside a compressed boot image."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from treadle.shuttle.microvm import cpio
from treadle.shuttle.microvm.image import module_depends
from treadle.shuttle.microvm.kernel import KernelError, vmlinux

BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")
def test_an_archive_unpacks_as_written(tmp_path: Path) -> None:
    entries = [
        cpio.Entry("bin", stat.S_IFDIR | 0o755),
        cpio.Entry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        cpio.Entry("bin/link", stat.S_IFLNK | 0o777, b"tool"),
        cpio.Entry("odd", stat.S_IFREG | 0o600, b"x" * 4097),  # not a multiple of 4
    ]
    archive = io.BytesIO()
    cpio.write(entries, archive)
    assert BUSYBOX is not None
    subprocess.run(
        [BUSYBOX, "cpio", "-i", "-d"], input=archive.getvalue(), cwd=tmp_path, check=True
    )
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755
    assert (tmp_path / "bin/link").readlink() == Path("tool")
    assert (tmp_path / "odd").read_bytes() == b"x" * 4097


@pytest.mark.parametrize("name", ["", "/", "../etc/passwd", "a/../../b"])
def test_names_that_would_leave_the_archive_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        cpio.write([cpio.Entry(name, stat.S_IFREG | 0o644, b"")], io.BytesIO())


def test_devices_are_refused() -> None:
    with pytest.raises(ValueError):
        cpio.write([cpio.Entry("dev/null", stat.S_IFCHR | 0o666)], io.BytesIO())


ELF = b"\x7fELF" + bytes(range(256)) * 64


@pytest.mark.parametrize(
    "compress",
    [
        lambda data: lzma.compress(data, format=lzma.FORMAT_XZ),
        gzip.compress,
    ],
    ids=["xz", "gzip"],
)
def test_the_kernel_is_found_inside_its_boot_image(compress: object) -> None:
    assert callable(compress)
    # A bzImage: a setup header, the decompressor, then the payload and a trailer.
    boot = b"MZ" + b"\0" * 1000 + compress(ELF) + b"\0" * 64
    assert vmlinux(boot) == ELF
    assert vmlinux(ELF) == ELF  # already uncompressed


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_an_lz4_kernel_is_found_with_its_trailer_ignored() -> None:
    payload = subprocess.run(["lz4", "-l", "-c"], input=ELF, capture_output=True, check=True).stdout
    assert vmlinux(b"MZ" + b"\0" * 500 + payload + b"trailer") == ELF


def test_an_image_without_a_kernel_is_refused() -> None:
    with pytest.raises(KernelError):
        vmlinux(b"MZ" + b"\0" * 100 + b"\xfd7zXZ\x00 but not xz")


def test_a_module_s_dependencies_come_from_its_modinfo() -> None:
    module = b"\x7fELF...\0license=GPL\0depends=virtio,virtio-ring\0vermagic=6.1\0"
    assert module_depends(module) == ["virtio", "virtio_ring"]
    assert module_depends(b"\x7fELF\0license=GPL\0") == []
