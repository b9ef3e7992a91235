from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/support is a helper package shared by the suites, not a test package.
sys.path.insert(0, str(Path(__file__).parent))

from support.cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One Weaver and one Shuttle, real processes on loopback, shared by a module's tests."""
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:  # a failed start must not leave processes behind
        c.start_weaver()
        c.start_shuttle("node0")
        yield c
    finally:
        c.stop()
