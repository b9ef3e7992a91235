"""Placement strategies across a fleet of real Shuttles that differ in price, speed, region
and country: the same function lands where its strategy says, invoke can override the
strategy, hard constraints hold, and the API and `treadle explain` say why."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.cluster import PYTHON, Cluster, eventually

pytestmark = pytest.mark.integration

# name, price per hour, speed, region, zone, country, provider
NODES = [
    ("cheap", "0.10", "1.0", "eu-west", "eu-west-a", "IE", "lease"),
    ("fast", "1.60", "4.0", "us-east", "us-east-a", "US", "cloud"),
    ("middle", "0.40", "2.0", "eu-central", "eu-central-a", "DE", "cloud"),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("placement"))
    try:
        c.start_weaver()
        for name, price, perf, region, zone, country, provider in NODES:
            c.start_shuttle(
                name,
                *("--price", price, "--perf-score", perf, "--region", region, "--zone", zone),
                *("--country", country, "--provider", provider),
            )
        yield c
    finally:
        c.stop()


def _node_ids(api: httpx.Client) -> dict[str, str]:
    return {node["id"]: node["name"] for node in api.get("/v1/nodes").json()["items"]}


def _create(api: httpx.Client, name: str, placement: dict[str, Any]) -> None:
    response = api.post(
        "/v1/functions",
        json={"name": name, "command": [PYTHON, "-c", "print(13)"], "placement": placement},
    )
    assert response.status_code in (200, 201), response.text


def _placed_on(api: httpx.Client, function: str, **invoke: Any) -> tuple[str, dict[str, Any]]:
    execution = api.post(f"/v1/functions/{function}/invoke", params={"wait": 30}, json=invoke)
    assert execution.status_code == 200, execution.text
    body = execution.json()
    assert body["state"] == "success", body
    answer = api.get(f"/v1/executions/{body['id']}/placement").json()
    return _node_ids(api)[answer["node_id"]], answer


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("lowest_cost", "cheap"), ("best_performance", "fast")],
)
def test_each_strategy_picks_its_node(fleet: Cluster, strategy: str, expected: str) -> None:
    with fleet.client() as api:
        _create(api, f"by-{strategy.replace('_', '-')}", {"strategy": strategy})
        node, answer = _placed_on(api, f"by-{strategy.replace('_', '-')}")
    assert node == expected
    placement = answer["placement"]
    assert placement["strategy"] == strategy
    assert placement["candidates"] == 3
    assert set(placement["breakdown"]) >= {"cost", "performance", "load", "reliability"}
    assert placement["weights"]["cost" if strategy == "lowest_cost" else "performance"] > 0


def test_invoke_overrides_the_strategy(fleet: Cluster) -> None:
    with fleet.client() as api:
        _create(api, "overridden", {"strategy": "lowest_cost"})
        assert _placed_on(api, "overridden")[0] == "cheap"
        node, answer = _placed_on(api, "overridden", strategy="best_performance")
    assert node == "fast"
    assert answer["placement"]["strategy"] == "best_performance"


def test_custom_weights_trade_cost_against_speed(fleet: Cluster) -> None:
    with fleet.client() as api:
        # Speed counts a little more than cost: the middle node is the best compromise
        # (cost 0.8 and speed 0.33 normalized, against 1/0 and 0/1 for the others).
        _create(
            api, "compromise", {"strategy": "custom", "weights": {"cost": 1, "performance": 1.2}}
        )
        node, answer = _placed_on(api, "compromise")
    assert node == "middle", answer


def test_hard_constraints_hold_whatever_the_strategy(fleet: Cluster) -> None:
    with fleet.client() as api:
        _create(api, "in-germany", {"strategy": "lowest_cost", "countries": ["DE"]})
        assert _placed_on(api, "in-germany")[0] == "middle"
        _create(
            api,
            "in-europe-fast",
            {"strategy": "best_performance", "regions": ["eu-west", "eu-central"]},
        )
        assert _placed_on(api, "in-europe-fast")[0] == "middle"

        _create(api, "too-dear", {"max_price_per_hour": 0.001})
        execution = api.post("/v1/functions/too-dear/invoke", json={}).json()
        reason = eventually(
            lambda: api.get(f"/v1/executions/{execution['id']}").json()["pending_reason"],
            what="a reason why nothing fits",
        )
        assert "max price" in reason
        answer = api.get(f"/v1/executions/{execution['id']}/placement").json()
        assert answer["placement"] is None
        assert answer["pending_reason"] == reason
        api.post(f"/v1/executions/{execution['id']}/cancel")


def test_explain_says_why(fleet: Cluster) -> None:
    with fleet.client() as api:
        _create(api, "explained", {"strategy": "lowest_cost"})
        execution = api.post("/v1/functions/explained/invoke", params={"wait": 30}, json={})
        execution_id = execution.json()["id"]
    env = dict(fleet.env, TREADLE_URL=fleet.url, TREADLE_API_KEY=fleet.admin_key)
    shown = subprocess.run(
        [sys.executable, "-m", "treadle", "explain", execution_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "strategy lowest_cost" in shown.stdout
    assert "3 feasible node(s) compared" in shown.stdout
    assert "runner-up" in shown.stdout
    assert "cost " in shown.stdout


@pytest.mark.parametrize(
    ("placement", "field"),
    [
        ({"strategy": "cheapest"}, "strategy"),
        ({"strategy": "custom", "weights": {"cost": -1}}, "weights"),
        ({"strategy": "custom", "weights": {"cost": 0, "load": 0}}, "weights"),
        ({"strategy": "custom", "weights": {"price": 1}}, "weights"),
        ({"strategy": "balanced", "weights": {"cost": 1}}, "weights are only for strategy custom"),
        ({"gpu": {"count": 0, "type": "a100"}}, "gpu"),
        ({"countries": ["germany"]}, "countries"),
        ({"max_price_per_hour": -2}, "max_price_per_hour"),
    ],
)
def test_bad_placement_is_refused_naming_the_field(
    fleet: Cluster, placement: dict[str, Any], field: str
) -> None:
    with fleet.client() as api:
        response = api.post(
            "/v1/functions", json={"name": "bad", "command": ["true"], "placement": placement}
        )
    assert response.status_code == 422, response.text
    assert field in response.text
