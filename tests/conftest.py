from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/support is a helper package shared by the suites, not a test package.
sys.path.insert(0, str(Path(__file__).parent))

from support.cluster import Cluster
from support.postgres import Postgres, postgres_binaries


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server, started once. Skipped where none is installed, except in CI,
    whose test command installs one: there its absence is a failure."""
    binaries = postgres_binaries()
    if binaries is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; scripts/test installs it")
        pytest.skip("PostgreSQL is not installed (scripts/test installs it)")
    server = Postgres(binaries).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One Weaver and one Shuttle, real processes on loopback, shared by a module's tests;
    once on each store."""
    settings: dict[str, str] = {}
    if request.param == "postgresql":
        settings["database_url"] = request.getfixturevalue("postgres").create_database()
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:  # a failed start must not leave processes behind
        c.start_weaver(**settings)
        c.start_shuttle("node0")
        yield c
    finally:
        c.stop()
