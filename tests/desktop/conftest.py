"""Fixtures for the desktop suite: a real Weaver and a Shuttle of the namespace tier, whose
sandboxes can have a display (Xvfb, openbox, x11vnc and ctrl, all inside the sandbox)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from desktop.programs import Recorder
from support.cluster import Cluster
from treadle.client import Client, Sandbox

NEEDED = {
    "Xvfb": shutil.which("Xvfb"),
    "x11vnc": shutil.which("x11vnc"),
    "python3-xlib": Path("/usr/lib/python3/dist-packages/Xlib").is_dir() or None,
    "python3-pil": Path("/usr/lib/python3/dist-packages/PIL").is_dir() or None,
    "novnc": Path("/usr/share/novnc/core/rfb.js").is_file() or None,
}
MISSING = [name for name, found in NEEDED.items() if not found]


@pytest.fixture(scope="package")
def desktop_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if MISSING:
        pytest.skip(f"not installed: {', '.join(MISSING)} (scripts/test installs them)")
    cluster = Cluster(tmp_path_factory.mktemp("desktop"))
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle("desk0", "--runtime", "namespace", "--cpu", "64000")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="package")
def client(desktop_cluster: Cluster) -> Iterator[Client]:
    with Client(url=desktop_cluster.url, api_key=desktop_cluster.admin_key) as made:
        yield made


@pytest.fixture(scope="package")
def desktop(client: Client) -> Iterator[Sandbox]:
    """One desktop sandbox of 640x400 for the suite (each test leaves it as it found it)."""
    sandbox = Sandbox.create(
        client=client, desktop={"width": 640, "height": 400}, timeout=900, metadata={"t": "d"}
    )
    try:
        sandbox.wait_for_status("running", timeout=60)
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture
def recorder(desktop: Sandbox) -> Iterator[Recorder]:
    """The input recorder, running in the suite's desktop sandbox for one test."""
    found = Recorder(desktop)
    try:
        yield found
    finally:
        found.close()
