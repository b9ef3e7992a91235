"""What happens while a node's link to Weaver is cut and comes back (DESIGN §3)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cluster import Cluster, eventually
from support.processes import pids_with
from support.proxy import Proxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cut_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Proxy]]:
    c = Cluster(tmp_path_factory.mktemp("cut"))
    proxy: Proxy | None = None
    try:
        # a long down-after, so a cut link is a reconnect within the grace, not a lost node
        c.start_weaver(node_down_after_s="30")
        proxy = Proxy(c.port)
        c.start_shuttle("behind-proxy", via=proxy.url)
        yield c, proxy
    finally:
        if proxy is not None:
            proxy.close()
        c.stop()


def test_cancel_issued_while_the_link_is_down_reaches_the_node(
    cut_cluster: tuple[Cluster, Proxy], tmp_path: Path
) -> None:
    cluster, proxy = cut_cluster
    marker = f"treadle-cut-{uuid.uuid4().hex}"
    started = tmp_path / "started"
    with cluster.client() as api:
        api.post(
            "/v1/functions",
            json={
                "name": "long",
                "command": ["/bin/bash", "-c", f"touch {started}; exec -a {marker} sleep 300"],
            },
        )
        execution = api.post("/v1/functions/long/invoke", json={}).json()
        eventually(lambda: pids_with(marker), what="the job to run")
        proxy.cut()
        eventually(
            lambda: not cluster.node_named("behind-proxy", connected=True),
            what="Weaver to notice the cut",
        )
        cancelled = api.post(f"/v1/executions/{execution['id']}/cancel").json()
        assert cancelled["state"] == "cancelled"
        assert pids_with(marker), "the node cannot have heard of the cancel yet"
        proxy.restore()
        eventually(
            lambda: not pids_with(marker),
            timeout=30,
            what="the process to be killed once the node reconnects",
        )
        final = api.get(f"/v1/executions/{execution['id']}").json()
        assert final["state"] == "cancelled"
        node = eventually(
            lambda: cluster.node_named("behind-proxy", connected=True), what="the node to be back"
        )
        eventually(
            lambda: (n := cluster.node_named("behind-proxy")) and n["running"] == 0,
            what="the node's capacity to be released",
        )
        del node
