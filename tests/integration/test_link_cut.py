"""What happens while a node's link to Weaver is cut and comes back (DESIGN §3)."""

from __future__ import annotations

import signal
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
    eventually(
        lambda: not cluster.node_named("behind-proxy", connected=True),
        what="Weaver to let go of the cut link",
    )


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


def test_work_whose_start_report_was_lost_is_running_and_runs_again_as_a_new_attempt(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, store: dict[str, str]
) -> None:
    """The node's `started` report is lost with its link: its hello must say the attempt runs.
    When that node is lost as well, the work runs again under a new attempt number, so the
    old run's output, if it ever arrives, cannot mix with the new one's."""
    half, gate = tmp_path / "half", tmp_path / "gate"
    script = (
        f"i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); "
        f"if [ $i -eq 1000 ] && [ ! -e {gate} ]; then touch {half}; "
        f"while [ ! -e {gate} ]; do sleep 0.01; done; fi; done"
    )
    c = Cluster(tmp_path_factory.mktemp("lost-start"))
    proxy: Proxy | None = None
    try:
        c.start_weaver(node_down_after_s="1", node_startup_grace_s="0", **store)
        proxy = Proxy(c.port)
        first = c.start_shuttle("first", via=proxy.url)
        with c.client() as api:
            api.post(
                "/v1/functions",
                json={
                    "name": "lines",
                    "command": ["/bin/sh", "-c", script],
                    "max_attempts": 3,
                    "resources": {"cpu_millicores": 100, "memory_mib": 16, "disk_mib": 0},
                },
            )
            proxy.stall(downstream=False)  # what the node says from now on goes nowhere
            execution = api.post("/v1/functions/lines/invoke", json={}).json()
            eventually(half.exists, what="the job to print its first 1000 lines")
            proxy.cut()  # `started` and the output are lost in flight
            proxy.restore()
            running = eventually(
                lambda: (
                    (e := api.get(f"/v1/executions/{execution['id']}").json())["state"] == "running"
                    and e
                ),
                what="the reconnected node's hello to say it runs",
            )
            assert running["attempt"] == 1

            first.stop(signal.SIGKILL)
            gate.touch()
            c.start_shuttle("second")
            done = eventually(
                lambda: (
                    (e := api.get(f"/v1/executions/{execution['id']}").json())["state"]
                    not in ("open", "running")
                    and e
                ),
                timeout=30,
                what="the work to run again and end",
            )
            assert (done["state"], done["attempt"]) == ("success", 2)
            out = api.get(f"/v1/executions/{execution['id']}/output").json()
            assert out["complete"]
            assert out["stdout"].splitlines() == [f"line-{i}" for i in range(3000)]
    finally:
        if proxy is not None:
            proxy.close()
        c.stop()
