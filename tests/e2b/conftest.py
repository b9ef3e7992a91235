"""Fixtures for the E2B suite: a real Weaver and Shuttle, and the SDK versions to drive them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from e2b.programs import MODES, SDK, SDKS
from support.cluster import Cluster


@pytest.fixture(scope="module")
def e2b_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One Weaver and a Shuttle offering the namespace tier, which can pause (the process
    tier cannot), with network allowed: an E2B sandbox has internet access unless it asks
    for none."""
    cluster = Cluster(tmp_path_factory.mktemp("e2b"))
    try:
        cluster.start_weaver(process_tier=False)
        # Sandboxes here idle: offer more CPU to reserve than the test machine has, so that
        # the suite's sandboxes are placed at once rather than waiting for earlier ones to end.
        cluster.start_shuttle("ns0", "--runtime", "namespace", "--allow-network", "--cpu", "64000")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=[(v, m) for v in SDKS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def sdk(request: pytest.FixtureRequest, e2b_cluster: Cluster) -> SDK:
    version, mode = request.param
    found = SDK(e2b_cluster, version, mode)
    if not found.python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"e2b {version} is not installed; scripts/test installs it")
        pytest.skip(f"e2b {version} is not installed (scripts/e2b-sdks installs it)")
    return found


@pytest.fixture(scope="module")
def other_key(e2b_cluster: Cluster) -> str:
    """An API key of another tenant."""
    with e2b_cluster.client() as admin:
        created = admin.post("/v1/tenants", json={"name": "e2b-other"})
        assert created.status_code == 201, created.text
        return str(created.json()["api_key"])


@pytest.fixture
def raw(e2b_cluster: Cluster) -> Iterator[httpx.Client]:
    """Plain HTTP as the SDK sends it: the API key in `X-API-Key`."""
    with httpx.Client(
        base_url=e2b_cluster.url, timeout=60, headers={"X-API-Key": e2b_cluster.admin_key}
    ) as client:
        yield client
