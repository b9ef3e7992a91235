"""Fixtures for the microvm suite: the guest image, built from the kernel package that
`scripts/build-guest` fetched (scripts/test runs it), into this test run's own state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from treadle.shuttle.microvm.image import GuestImage, build, find_package

PACKAGE = find_package()
MISSING = [
    name
    for name, found in {
        "qemu-system-x86_64": shutil.which("qemu-system-x86_64"),
        "busybox": shutil.which("busybox") or Path("/bin/busybox").is_file() or None,
        "a kernel package (scripts/build-guest)": PACKAGE,
    }.items()
    if not found
]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if MISSING:
        pytest.skip(f"not installed: {', '.join(MISSING)} (scripts/test installs them)")
    return tmp_path_factory.mktemp("microvm-images")


@pytest.fixture(scope="session")
def image(images: Path) -> GuestImage:
    assert PACKAGE is not None
    return build(PACKAGE, images)
