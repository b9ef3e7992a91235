"""Several Weaver replicas serve one fleet through PostgreSQL and NATS JetStream (DESIGN §6):
a node's link is held by one replica, yet work invoked, cancelled or awaited through another
reaches it; one replica at a time reconciles the fleet, and another takes over when it dies;
an idempotency key names one execution whichever replica it reaches."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.cluster import PYTHON, Cluster, eventually
from support.nats import NatsServer
from support.postgres import Postgres
from support.processes import pids_with

pytestmark = pytest.mark.integration

GATED = (
    "import os, sys, time\n"
    "open(os.environ['STARTED'] + os.environ['TREADLE_ATTEMPT'], 'w').close()\n"
    "while not os.path.exists(os.environ['GATE']): time.sleep(0.01)\n"
    "print('done')\n"
)


class Replicas:
    def __init__(self, root: Path, settings: dict[str, str]) -> None:
        self.a = Cluster(root / "a")
        self.b = Cluster(root / "b")
        # One operator's replicas share the credentials they hand out.
        self.b.home = self.a.home
        self.settings = settings

    def start(self) -> Replicas:
        self.a.start_weaver(**self.settings)
        eventually(lambda: self.leads(self.a), what="the first replica to lead")
        self.b.start_weaver(**self.settings)
        return self

    @staticmethod
    def leads(replica: Cluster) -> bool:
        try:
            return bool(httpx.get(f"{replica.url}/healthz", timeout=2).json()["leader"])
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()


@pytest.fixture
def replicas(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, nats_server: NatsServer
) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("replicas")
    (root / "a").mkdir()
    (root / "b").mkdir()
    stream = nats_server.new_stream()
    r = Replicas(
        root,
        {
            "database_url": postgres.create_database(),
            "nats_url": nats_server.url,
            "nats_stream": stream,
            "node_down_after_s": "1",
            "node_startup_grace_s": "2",
        },
    )
    try:  # a failed start must not leave processes behind
        yield r.start()
    finally:
        r.stop()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate"
    yield path
    path.touch()  # no job keeps polling after a failed test


def _gated_function(api: httpx.Client, tmp_path: Path, gate: Path, marker: str) -> Path:
    started = tmp_path / "started"
    response = api.post(
        "/v1/functions",
        json={
            "name": "gated",
            "command": [PYTHON, "-c", GATED, marker],
            "max_attempts": 3,
            "env": {"GATE": str(gate), "STARTED": str(started)},
            "resources": {"cpu_millicores": 100},
        },
    )
    assert response.status_code == 201, response.text
    return started


def test_work_invoked_and_cancelled_through_one_replica_runs_and_stops_on_the_others_node(
    replicas: Replicas, tmp_path: Path, gate: Path
) -> None:
    a, b = replicas.a, replicas.b
    a.start_shuttle("only-on-a")  # its link goes to replica A alone
    marker = f"cancel-across-{uuid.uuid4().hex}"
    with b.client() as via_b:
        started = _gated_function(via_b, tmp_path, gate, marker)
        execution = via_b.post("/v1/functions/gated/invoke", json={}).json()
        eventually(lambda: Path(f"{started}1").exists(), what="the job to start on A's node")
        running = eventually(
            lambda: (
                (e := via_b.get(f"/v1/executions/{execution['id']}").json())["state"] == "running"
                and e
            ),
            what="B to see it running",
        )
        assert running["node_id"] == a.node_named("only-on-a")["id"]  # type: ignore[index]
        assert pids_with(marker)

        cancelled = via_b.post(f"/v1/executions/{execution['id']}/cancel").json()
        assert cancelled["state"] == "cancelled"
        eventually(lambda: not pids_with(marker), what="A's node to kill the cancelled job")

        # A call that waits through B for work done on A's node returns its end.
        via_b.post("/v1/functions", json={"name": "echo", "command": ["/bin/echo", "{w}"]})
        done = via_b.post("/v1/functions/echo/invoke?wait=30", json={"args": {"w": "hi"}}).json()
        assert done["state"] == "success", done
        assert via_b.get(f"/v1/executions/{done['id']}/output").json()["stdout"] == "hi\n"


def test_another_replica_takes_over_reconciling_when_the_leader_dies(
    replicas: Replicas, tmp_path: Path, gate: Path
) -> None:
    a, b = replicas.a, replicas.b
    assert replicas.leads(a) and not replicas.leads(b)
    b.start_shuttle("one", via=b.url)
    b.start_shuttle("two", via=b.url)
    assert a.weaver is not None
    a.weaver.stop(signal.SIGKILL)
    eventually(lambda: replicas.leads(b), what="B to take over leadership")

    with b.client() as api:
        started = _gated_function(api, tmp_path, gate, f"failover-{uuid.uuid4().hex}")
        execution = api.post("/v1/functions/gated/invoke", json={}).json()
        eventually(lambda: Path(f"{started}1").exists(), what="attempt 1 to start")
        first = api.get(f"/v1/executions/{execution['id']}").json()
        nodes = {n["id"]: n["name"] for n in api.get("/v1/nodes").json()["items"]}
        victim = nodes[first["node_id"]]
        next(p for p in b.shuttles if p.args[p.args.index("--name") + 1] == victim).stop(
            signal.SIGKILL
        )
        # Only a leader marks the node down and requeues its work: B must be doing it.
        eventually(lambda: Path(f"{started}2").exists(), timeout=30, what="attempt 2 to start")
        second = api.get(f"/v1/executions/{execution['id']}").json()
        assert second["attempt"] == 2
        assert second["node_id"] != first["node_id"]
        victim_node = next(n for n in api.get("/v1/nodes").json()["items"] if n["name"] == victim)
        assert victim_node["state"] == "down"
        gate.touch()
        final = eventually(
            lambda: (
                (e := api.get(f"/v1/executions/{execution['id']}").json())["state"] == "success"
                and e
            ),
            what="attempt 2 to finish",
        )
        assert final["attempt"] == 2


def test_one_idempotency_key_names_one_execution_across_replicas(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    a.start_shuttle("worker")
    with a.client() as api:
        api.post("/v1/functions", json={"name": "echo", "command": ["/bin/echo", "{k}"]})
    keys = [f"key-{i}" for i in range(20)]

    def invoke(target: Cluster, key: str) -> dict[str, Any]:
        with target.client() as api:
            response = api.post(
                "/v1/functions/echo/invoke", json={"args": {"k": key}, "idempotency_key": key}
            )
            assert response.status_code in (200, 201, 202), response.text
            return dict(response.json())

    # Each key reaches both replicas at once, twice over.
    with ThreadPoolExecutor(8) as pool:
        futures = [
            (key, pool.submit(invoke, target, key)) for key in keys for target in (a, b, a, b)
        ]
        by_key: dict[str, set[str]] = {}
        for key, future in futures:
            by_key.setdefault(key, set()).add(future.result()["id"])
    assert all(len(ids) == 1 for ids in by_key.values()), {
        k: v for k, v in by_key.items() if len(v) > 1
    }
    with b.client() as api:
        listed = api.get("/v1/executions", params={"function": "echo", "limit": 100}).json()
    assert len(listed["items"]) == len(keys)
    assert {e["id"] for e in listed["items"]} == {ids.pop() for ids in by_key.values()}
