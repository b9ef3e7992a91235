"""What happens while a node's link to Weaver is cut and comes back (DESIGN §3)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import STORES, store_settings
from support.cluster import PYTHON, Cluster, eventually
from support.processes import pids_with
from support.proxy import Proxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=STORES)
def cut_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Proxy]]:
    c = Cluster(tmp_path_factory.mktemp("cut"))
    proxy: Proxy | None = None
    try:
        # a long down-after, so a cut link is a reconnect within the grace, not a lost node
        c.start_weaver(node_down_after_s="30", **store_settings(request))
        proxy = Proxy(c.port)
        c.start_shuttle("behind-proxy", via=proxy.url)
        yield c, proxy
    finally:
        if proxy is not None:
            proxy.close()
        c.stop()


def _wait_until_weaver_notices_the_cut(cluster: Cluster) -> None:
    try:
        eventually(lambda: not cluster.node_named("behind-proxy", connected=True))
    except AssertionError:
        # Seen once under a full run and not reproduced since: keep what explains it.
        weaver = cluster.weaver.output()[-4000:] if cluster.weaver else ""
        shuttle = cluster.shuttles[0].output()[-4000:] if cluster.shuttles else ""
        raise AssertionError(
            f"Weaver still has the node connected after the cut\n"
            f"node: {cluster.node_named('behind-proxy')}\n"
            f"weaver log:\n{weaver}\nshuttle log:\n{shuttle}"
        ) from None


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
        _wait_until_weaver_notices_the_cut(cluster)
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


def test_output_cut_mid_stream_arrives_complete_in_order_once(
    cut_cluster: tuple[Cluster, Proxy], tmp_path: Path
) -> None:
    cluster, proxy = cut_cluster
    half, gate = tmp_path / "half", tmp_path / "gate"
    script = (
        "import os, sys, time\n"
        "for i in range(50000): print(i)\n"
        "sys.stdout.flush()\n"
        f"open({str(half)!r}, 'w').close()\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "for i in range(50000, 100000): print(i)\n"
    )
    with cluster.client() as api:
        api.post("/v1/functions", json={"name": "stream", "command": [PYTHON, "-c", script]})
        execution = api.post("/v1/functions/stream/invoke", json={}).json()
        eventually(half.exists, what="the first half to be printed")
        proxy.cut()
        gate.touch()  # the second half and the exit happen while the link is down
        _wait_until_weaver_notices_the_cut(cluster)
        proxy.restore()
        done = eventually(
            lambda: (
                (e := api.get(f"/v1/executions/{execution['id']}").json())["state"] == "success"
                and e
            ),
            timeout=60,
            what="the exit report to be replayed",
        )
        assert done["attempt"] == 1  # the node came back in time: no second run
        out = api.get(f"/v1/executions/{execution['id']}/output").json()
        assert out["complete"] is True
        assert out["stdout"].splitlines() == [str(i) for i in range(100000)]
