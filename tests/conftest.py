from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/support is a helper package shared by the suites, not a test package.
sys.path.insert(0, str(Path(__file__).parent))

from support.cluster import Cluster
from support.nats import NatsServer, nats_binary
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


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A real NATS server with JetStream, started once; required in CI like PostgreSQL."""
    binary = nats_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed; scripts/test installs it")
        pytest.skip("nats-server is not installed (scripts/test installs it)")
    server = NatsServer(binary).start()
    yield server
    server.stop()


STORES = ["sqlite", "postgresql"]


def store_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """Weaver settings for the store a fixture parametrized over STORES was given."""
    if request.param == "postgresql":
        return {"database_url": request.getfixturevalue("postgres").create_database()}
    return {}


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., str]:
    """`database_url(store, name)`: the URL of a fresh, empty database of `store` (the
    session's PostgreSQL server, or a SQLite file under the test's directory)."""

    def make(store: str, name: str = "store") -> str:
        if store == "postgresql":
            return str(request.getfixturevalue("postgres").create_database())
        return f"sqlite:///{tmp_path / name}.db"

    return make


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """For tests that start their own cluster: once on each store."""
    return store_settings(request)


@pytest.fixture(scope="module", params=STORES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One Weaver and one Shuttle, real processes on loopback, shared by a module's tests;
    once on each store."""
    settings = store_settings(request)
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:  # a failed start must not leave processes behind
        c.start_weaver(**settings)
        c.start_shuttle("node0")
        yield c
    finally:
        c.stop()
