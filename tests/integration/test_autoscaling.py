"""Autoscaling with the `local` provider: Weaver starts a Shuttle for work that fits no
node but fits an offer (the one its strategy prefers), within quota and budget, and releases
nodes that stay idle."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.cluster import PYTHON, Cluster, eventually
from support.runtimes import pids_with

pytestmark = pytest.mark.integration


def _offer(instance_type: str, price: float, region: str, country: str, **extra: Any) -> Any:
    return {
        "instance_type": instance_type,
        "region": region,
        "zone": f"{region}-a",
        "country": country,
        "cpu_millicores": 2000,
        "memory_mib": 2048,
        "price_per_hour": price,
        **extra,
    }


PROVIDERS = {
    "budget_per_hour": 1.0,
    "scale_down_after_s": 1.5,
    "providers": [
        {"kind": "local", "name": "eu", "max_instances": 2,
         "offers": [_offer("small", 0.10, "eu-west", "IE")]},
        {"kind": "local", "name": "us", "max_instances": 1,
         "offers": [_offer("small", 0.30, "us-east", "US"),
                    _offer("huge", 4.00, "us-east", "US", memory_mib=65536)]},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("autoscaling")
    providers = root / "providers.json"
    providers.write_text(json.dumps(PROVIDERS))
    c = Cluster(root)
    try:
        c.start_weaver(providers_file=str(providers))
        yield c
    finally:
        c.stop()


def _create(api: httpx.Client, name: str, **fields: Any) -> None:
    body = {"name": name, "command": [PYTHON, "-c", "print(13)"], **fields}
    response = api.post("/v1/functions", json=body)
    assert response.status_code in (200, 201), response.text


def _nodes(api: httpx.Client) -> dict[str, dict[str, Any]]:
    return {node["id"]: node for node in api.get("/v1/nodes").json()["items"]}


def _run(api: httpx.Client, function: str) -> dict[str, Any]:
    response = api.post(f"/v1/functions/{function}/invoke", params={"wait": 90}, json={})
    execution = dict(response.json())
    assert execution["state"] == "success", execution
    return execution


def test_work_that_fits_no_node_starts_the_cheapest_fitting_offer(autoscaled: Cluster) -> None:
    with autoscaled.client() as api:
        assert _nodes(api) == {}
        _create(api, "cheap", placement={"strategy": "lowest_cost"})
        execution = _run(api, "cheap")
        node = _nodes(api)[execution["node_id"]]
        assert node["provider"] == "eu"
        assert (node["price_per_hour"], node["region"], node["country"]) == (0.1, "eu-west", "IE")

        # A constraint the cheap offer cannot meet starts the other provider's node.
        _create(api, "american", placement={"strategy": "lowest_cost", "countries": ["US"]})
        american = _run(api, "american")
        assert _nodes(api)[american["node_id"]]["provider"] == "us"


def test_idle_started_nodes_are_released(autoscaled: Cluster) -> None:
    with autoscaled.client() as api:
        _create(api, "again", placement={"strategy": "lowest_cost"})
        _run(api, "again")

        def all_gone() -> bool:
            nodes = _nodes(api).values()
            return bool(nodes) and not any(node["connected"] for node in nodes)

        eventually(all_gone, timeout=60, what="idle started nodes to be released")
        states = {node["state"] for node in _nodes(api).values()}
        assert states <= {"draining", "disconnected"}


def test_an_offer_over_the_budget_is_not_started(autoscaled: Cluster) -> None:
    with autoscaled.client() as api:
        _create(api, "enormous", resources={"memory_mib": 60000})
        execution = api.post("/v1/functions/enormous/invoke", json={}).json()
        reason = eventually(
            lambda: api.get(f"/v1/executions/{execution['id']}").json()["pending_reason"],
            what="a reason why it waits",
        )
        assert "being started" not in reason
        assert "memory" in reason
        big = [n for n in _nodes(api).values() if n["capacity"]["memory_mib"] > 60000]
        assert big == []
        api.post(f"/v1/executions/{execution['id']}/cancel")


def test_a_bad_providers_file_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "providers.json"
    bad.write_text(json.dumps({"providers": [{"kind": "local", "offers": []}]}))
    run = subprocess.run(
        [sys.executable, "-m", "treadle", "weaver", "--home", str(tmp_path / "h"),
         "--port", "1", "--providers", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "providers.0" in run.stderr and "offers" in run.stderr
    assert "Traceback" not in run.stderr


SPOT = {
    "scale_down_after_s": 60,
    "providers": [
        {"kind": "local", "name": "spoteu",
         "offers": [_offer("small", 0.10, "eu-west", "IE", spot_price_per_hour=0.02)]},
        {"kind": "local", "name": "ondemand", "offers": [_offer("small", 0.30, "us-east", "US")]},
    ],
}  # fmt: skip


def test_a_reclaimed_spot_node_is_lost_and_its_work_avoids_the_region(tmp_path: Path) -> None:
    providers = tmp_path / "providers.json"
    providers.write_text(json.dumps(SPOT))
    release = tmp_path / "release"
    c = Cluster(tmp_path)
    try:
        c.start_weaver(providers_file=str(providers), node_down_after_s="1")
        with c.client() as api:
            _create(
                api,
                "interruptible",
                command=[PYTHON, "-c", _WAIT_FOR.format(path=str(release))],
                placement={"strategy": "lowest_cost", "spot": True},
            )
            execution = api.post("/v1/functions/interruptible/invoke", json={}).json()

            def running_on() -> str | None:
                row = api.get(f"/v1/executions/{execution['id']}").json()
                return str(row["node_id"]) if row["state"] == "running" else None

            first = eventually(running_on, timeout=60, what="the work to run on a spot node")
            node = _nodes(api)[first]
            assert (node["provider"], node["spot"], node["region"]) == ("spoteu", True, "eu-west")

            # The provider takes the machine back: its Shuttle dies without a word.
            pids = pids_with(node["name"])
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

            second = eventually(
                lambda: (n := running_on()) and n != first and n,
                timeout=60,
                what="the work to run again elsewhere",
            )
            moved = _nodes(api)[second]
            assert moved["region"] == "us-east"
            release.touch()
            done = api.get(f"/v1/executions/{execution['id']}").json()
            assert done["attempt"] == 2
            answer = api.get(f"/v1/executions/{execution['id']}/placement").json()
            assert answer["placement"]["avoid_regions"] == ["eu-west"]
            assert answer["placement"]["avoid_nodes"] == [first]
    finally:
        c.stop()


_WAIT_FOR = (
    "import os, time\nwhile not os.path.exists({path!r}):\n    time.sleep(0.02)\nprint('done')\n"
)
