"""The simulated Shuttles shipped for measuring Weaver alone: real agent connections that a
real Weaver places work on, whose runtime does nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from support.cluster import Cluster, eventually
from treadle.client import AsyncClient
from treadle.shuttle.simulate import SimulatedFleet

pytestmark = pytest.mark.integration


@pytest.fixture
def weaver(tmp_path_factory: pytest.TempPathFactory, store: dict[str, str]) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("simulated"))
    try:
        made.start_weaver(**store)
        yield made
    finally:
        made.stop()


def test_a_simulated_fleet_joins_and_runs_a_batch_across_its_nodes(weaver: Cluster) -> None:
    with weaver.client() as api:
        created = api.post(
            "/v1/functions",
            json={
                "name": "nothing",
                "command": ["true"],
                "isolation": "namespace",
                "resources": {"cpu_millicores": 10, "memory_mib": 16, "disk_mib": 1},
            },
        )
        assert created.status_code == 201, created.text

    async def scenario() -> tuple[list[Any], int, int]:
        fleet = SimulatedFleet(weaver.url, weaver.join_token, 40, prefix="sim")
        await fleet.start()
        try:
            async with AsyncClient(weaver.url, weaver.admin_key) as client:
                ran = [e async for e in client.map("nothing", [{"i": i} for i in range(400)])]
            return ran, fleet.ended, sum(node.assigned for node in fleet.nodes)
        finally:
            await fleet.stop()

    ran, ended, assigned = asyncio.run(scenario())
    assert len(ran) == 400 and {e["state"] for e in ran} == {"success"}
    assert ended == assigned == 400  # each placed once, on a node that ran it
    nodes = {e["node_id"] for e in ran}
    assert len(nodes) >= 20  # spread, not piled on one node
    with weaver.client() as api:
        names = {n["id"]: n["name"] for n in api.get("/v1/nodes").json()["items"]}
    assert {names[node] for node in nodes} <= {f"sim-{n}" for n in range(40)}

    def all_gone() -> bool:
        with weaver.client() as api:
            return all(not n["connected"] for n in api.get("/v1/nodes").json()["items"])

    eventually(all_gone, what="the fleet's nodes to be seen gone")
