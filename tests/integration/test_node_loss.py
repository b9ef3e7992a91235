"""A node that dies takes none of its work with it (DESIGN §3)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import STORES, store_settings
from support.cluster import PYTHON, Cluster, eventually

pytestmark = pytest.mark.integration

GATED = (
    "import os, time\n"
    "print('attempt', os.environ['TREADLE_ATTEMPT'], flush=True)\n"
    "open(os.environ['STARTED'] + os.environ['TREADLE_ATTEMPT'], 'w').close()\n"
    "while not os.path.exists(os.environ['GATE']): time.sleep(0.01)\n"
)


@pytest.fixture(scope="module", params=STORES)
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("fleet"))
    try:  # a failed start must not leave processes behind
        c.start_weaver(node_down_after_s="1", node_startup_grace_s="0", **store_settings(request))
        c.start_shuttle("a")
        c.start_shuttle("b")
        yield c
    finally:
        c.stop()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """The file a gated job waits for; opened at teardown in any case, so a failed test leaves
    no job polling for it (the attempt of a killed node is nobody's child any more)."""
    path = tmp_path / "gate"
    yield path
    path.touch()


def _start_gated(
    api: httpx.Client, tmp_path: Path, gate: Path, name: str, max_attempts: int
) -> dict[str, Any]:
    started = tmp_path / "started"
    api.post(
        "/v1/functions",
        json={
            "name": name,
            "command": [PYTHON, "-c", GATED],
            "max_attempts": max_attempts,
            "env": {"GATE": str(gate), "STARTED": str(started)},
            "resources": {"cpu_millicores": 100},
        },
    )
    execution = api.post(f"/v1/functions/{name}/invoke", json={}).json()
    eventually(lambda: Path(f"{started}1").exists(), what="attempt 1 to start")
    return dict(api.get(f"/v1/executions/{execution['id']}").json())


def _kill_node(fleet: Cluster, node_id: str) -> str:
    with fleet.client() as api:
        nodes = api.get("/v1/nodes").json()["items"]
    name = next(n["name"] for n in nodes if n["id"] == node_id)
    proc = next(
        p for p in fleet.shuttles if p.alive() and p.args[p.args.index("--name") + 1] == name
    )
    proc.stop(signal.SIGKILL)
    return name


def test_work_of_a_killed_node_runs_again_on_another(
    fleet: Cluster, tmp_path: Path, gate: Path
) -> None:
    with fleet.client() as api:
        running = _start_gated(api, tmp_path, gate, "survivor", max_attempts=3)
        assert (running["state"], running["attempt"]) == ("running", 1)
        first_node = running["node_id"]
        killed = _kill_node(fleet, first_node)
        eventually(
            lambda: (tmp_path / "started2").exists(),
            timeout=30,
            what="attempt 2 to start on the other node",
        )
        gate.touch()
        final = api.post("/v1/functions/survivor/invoke", params={"wait": 0}, json={}).json()
        del final
        done = eventually(
            lambda: (
                (e := api.get(f"/v1/executions/{running['id']}").json())["state"] == "success" and e
            ),
            timeout=30,
            what="the execution to succeed",
        )
        assert done["attempt"] == 2
        assert done["node_id"] != first_node
        assert api.get(f"/v1/executions/{running['id']}/output").json()["stdout"] == "attempt 2\n"
        nodes = {n["name"]: n for n in api.get("/v1/nodes").json()["items"]}
        assert nodes[killed]["state"] == "down"
        # the dead node's own process of attempt 1 was orphaned, not adopted: let it end
        fleet.start_shuttle(killed)


def test_work_fails_node_lost_when_attempts_are_spent(
    fleet: Cluster, tmp_path: Path, gate: Path
) -> None:
    with fleet.client() as api:
        running = _start_gated(api, tmp_path, gate, "fragile", max_attempts=1)
        _kill_node(fleet, running["node_id"])
        done = eventually(
            lambda: (
                (e := api.get(f"/v1/executions/{running['id']}").json())["state"] != "running" and e
            ),
            timeout=30,
            what="the execution to end",
        )
        gate.touch()
        assert (done["state"], done["error"], done["attempt"]) == ("failure", "node_lost", 1)


def test_work_runs_again_where_it_was_lost_when_no_other_node_may_take_it(
    fleet: Cluster, tmp_path: Path, gate: Path
) -> None:
    """Avoiding the node where an attempt was lost is a preference, not a constraint: the
    only node allowed, back again, runs the next attempt."""
    fleet.start_shuttle("solo", "--label", "only=solo")
    started = tmp_path / "started"
    with fleet.client() as api:
        api.post(
            "/v1/functions",
            json={
                "name": "pinned",
                "command": [PYTHON, "-c", GATED],
                "env": {"GATE": str(gate), "STARTED": str(started)},
                "resources": {"cpu_millicores": 100},
                "placement": {"labels": {"only": "solo"}},
            },
        )
        execution = api.post("/v1/functions/pinned/invoke", json={}).json()
        eventually(lambda: Path(f"{started}1").exists(), what="attempt 1 to start")
        first = api.get(f"/v1/executions/{execution['id']}").json()["node_id"]
        _kill_node(fleet, first)
        eventually(
            lambda: api.get(f"/v1/executions/{execution['id']}").json()["attempt"] == 2,
            timeout=30,
            what="the work to be requeued",
        )
        fleet.start_shuttle("solo", "--label", "only=solo")
        eventually(lambda: Path(f"{started}2").exists(), timeout=30, what="attempt 2 to start")
        gate.touch()
        done = eventually(
            lambda: (
                (e := api.get(f"/v1/executions/{execution['id']}").json())["state"] == "success"
                and e
            ),
            timeout=30,
            what="the execution to succeed",
        )
        assert (done["attempt"], done["node_id"]) == (2, first)
        placement = api.get(f"/v1/executions/{execution['id']}/placement").json()["placement"]
        assert placement["avoid_nodes"] == [first]


def test_work_no_node_can_take_fails_unschedulable_after_the_deadline(
    tmp_path_factory: pytest.TempPathFactory, store: dict[str, str]
) -> None:
    c = Cluster(tmp_path_factory.mktemp("deadline"))
    try:
        c.start_weaver(unschedulable_after_s="1", **store)
        c.start_shuttle("small")
        with c.client() as api:
            api.post(
                "/v1/functions",
                json={
                    "name": "huge",
                    "command": ["/bin/true"],
                    "resources": {"memory_mib": 10_000_000},
                },
            )
            execution = api.post("/v1/functions/huge/invoke", json={}).json()
            done = eventually(
                lambda: (
                    (e := api.get(f"/v1/executions/{execution['id']}").json())["state"] != "open"
                    and e
                ),
                timeout=30,
                what="the deadline to pass",
            )
            assert (done["state"], done["error"]) == ("failure", "unschedulable")
            # work that fits is not affected
            api.post("/v1/functions", json={"name": "tiny", "command": ["/bin/true"]})
            ok = api.post("/v1/functions/tiny/invoke", params={"wait": 30}).json()
            assert ok["state"] == "success"
    finally:
        c.stop()


def test_a_stopped_shuttle_kills_what_it_runs(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    import uuid

    from support.processes import pids_with

    marker = f"treadle-term-{uuid.uuid4().hex}"
    c = Cluster(tmp_path_factory.mktemp("term"))
    try:
        c.start_weaver()
        shuttle = c.start_shuttle("stopping")
        with c.client() as api:
            api.post(
                "/v1/functions",
                json={
                    "name": "long",
                    "command": ["/bin/bash", "-c", f"exec -a {marker} sleep 300"],
                },
            )
            api.post("/v1/functions/long/invoke", json={})
            eventually(lambda: pids_with(marker), what="the job to run")
            shuttle.stop(signal.SIGTERM)
            assert not shuttle.alive()
            eventually(lambda: not pids_with(marker), timeout=10, what="the job to be killed")
    finally:
        c.stop()
