"""An invoke placed in the transaction that stores it, when nothing waits and a node has
room: what that placement reserved is given back when the invoke stores nothing after all."""

from __future__ import annotations

import httpx

from integration import test_hostile_input as hostile
from integration.test_executions import register
from integration.test_hostile_input import FakeNode, ended
from support.cluster import Cluster
from treadle.protocol import Exited, Started, encode

# The hand-played node and its cluster (each store).
cluster = hostile.cluster
node = hostile.node


def _whole_node(api: httpx.Client, node: FakeNode, name: str) -> None:
    # One execution takes all the fake node's CPU: a second fits only once the first ends.
    register(
        api,
        name,
        ["/bin/true"],
        placement=node.placement,
        resources={"cpu_millicores": 64_000, "memory_mib": 16},
    )


def test_a_retry_with_a_used_key_gives_back_the_capacity_its_placement_took(
    cluster: Cluster, node: FakeNode
) -> None:
    with cluster.client() as api:
        _whole_node(api, node, "whole-node")
        first = api.post("/v1/functions/whole-node/invoke", json={"idempotency_key": "once"})
        assert first.status_code == 202, first.text
        spec = node.assigned()
        assert spec.id == first.json()["id"]
        node.send(encode(Started(id=spec.id, attempt=spec.attempt)))
        node.send(encode(Exited(id=spec.id, attempt=spec.attempt, exit_code=0, chunks=0)))
        assert ended(api, spec)["state"] == "success"
        # The node is free: the retry is placed on it while stored, then finds its key held.
        again = api.post("/v1/functions/whole-node/invoke", json={"idempotency_key": "once"})
        assert again.json()["id"] == spec.id
        # Had the retry kept the node's CPU, this one would wait for it for ever.
        third = api.post("/v1/functions/whole-node/invoke", json={})
        assert third.status_code == 202, third.text
        assert node.assigned().id == third.json()["id"]
