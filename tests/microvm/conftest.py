"""Fixtures for the microvm suite: the guest image, built from the kernel package that
`scripts/build-guest` fetched (scripts/test runs it), where a node keeps it (a jailed VMM
reads it as the workload's own uid: the node's state directory lets it; a test's temporary
directory would not)."""

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
def package() -> Path:
    if MISSING or PACKAGE is None:
        pytest.skip(f"not installed: {', '.join(MISSING)} (scripts/test installs them)")
    return PACKAGE


@pytest.fixture(scope="session")
def image(package: Path) -> GuestImage:
    return build(package)
