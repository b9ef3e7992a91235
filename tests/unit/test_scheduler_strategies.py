"""Strategies: what each preset picks in small fleets made by hand, custom weights and their
validation, the breakdown that explains a choice, and determinism."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import (
    CRITERIA,
    PRESETS,
    NodeView,
    Placement,
    PolicyError,
    Request,
    Spread,
    Strategy,
    place,
    validate_policy,
)

CAP = Resources(cpu_millicores=4000, memory_mib=8192, disk_mib=10_000)


def node(node_id: str, cpu: int = 4000, mem: int = 8192, **kw: Any) -> NodeView:
    capacity = kw.pop("capacity", CAP)
    free = Resources.model_construct(
        cpu_millicores=cpu, memory_mib=mem, disk_mib=10_000, gpu_count=0, gpu_type=None
    )
    kw.setdefault("runtimes", frozenset({Tier.PROCESS}))
    return NodeView(id=node_id, capacity=capacity, free=free, **kw)


SMALL = Resources(cpu_millicores=1000, memory_mib=512)


def chosen(result: object) -> str:
    assert isinstance(result, Placement), result
    return result.node_id


# -- presets ---------------------------------------------------------------------------------


def test_lowest_cost_compares_the_cost_of_the_share_not_the_node_price() -> None:
    # 1000m of a 4-core node at 1.0/h costs 0.25/h; all of a 1-core node at 0.4/h costs 0.4/h
    one_core = Resources(cpu_millicores=1000, memory_mib=8192, disk_mib=10_000)
    nodes = [
        node("big", price_per_hour=1.0),
        node("small", cpu=1000, capacity=one_core, price_per_hour=0.4),
        node("pricey", price_per_hour=2.0),
    ]
    result = place(Request(resources=SMALL, strategy="lowest_cost"), nodes)
    assert chosen(result) == "big"
    assert isinstance(result, Placement)
    assert result.cost_per_hour == pytest.approx(0.25)
    assert result.breakdown["cost"] == 1.0


def test_lowest_cost_wins_even_against_a_much_emptier_node() -> None:
    # a weighted sum with load .05 could prefer the emptier node at a hair more cost;
    # lowest_cost must not: cheapest is a guarantee
    nodes = [
        node("full", cpu=1000, mem=600, price_per_hour=1.0),
        node("empty", price_per_hour=1.01),
    ]
    assert chosen(place(Request(resources=SMALL, strategy="lowest_cost"), nodes)) == "full"


def test_lowest_cost_packs_equally_cheap_nodes() -> None:
    nodes = [node("empty"), node("half", cpu=2000, mem=4096), node("busy", cpu=1500, mem=2000)]
    result = place(Request(resources=SMALL, strategy=Strategy.LOWEST_COST), nodes)
    assert chosen(result) == "busy"
    assert isinstance(result, Placement)
    # load under lowest_cost is fullness after placement
    assert result.breakdown["load"] == pytest.approx(1 - ((500 / 4000) + (1488 / 8192)) / 2)


def test_best_performance_picks_the_fastest_then_the_least_loaded() -> None:
    nodes = [
        node("slow", perf_score=1.0),
        node("fast-busy", cpu=1500, perf_score=2.0),
        node("fast-idle", perf_score=2.0),
        node("fast-too-small", cpu=500, perf_score=3.0),
    ]
    result = place(Request(resources=SMALL, strategy="best_performance"), nodes)
    assert chosen(result) == "fast-idle"
    assert isinstance(result, Placement)
    assert result.breakdown["performance"] == 1.0
    assert result.rejected == {"with too little free cpu": 1}


def test_balanced_trades_cost_against_speed() -> None:
    # Equal load and reliability. Costs normalize over the candidates: a node 10 % dearer
    # than the cheapest, when the dearest costs 3x, keeps most of the cost score and wins on
    # speed: .4 * .95 + .3 * 1 = .68 against .4 * 1 + .3 * .05 = .415.
    cheap_slow = node("cheap-slow", price_per_hour=1.0, perf_score=0.1)
    fast = node("fast", price_per_hour=1.1, perf_score=2.0)
    dear_slow = node("dear-slow", price_per_hour=3.0, perf_score=0.1)
    result = place(Request(resources=SMALL), [cheap_slow, fast, dear_slow])
    assert chosen(result) == "fast"
    assert isinstance(result, Placement)
    assert result.breakdown["cost"] == pytest.approx(0.95)
    # Without the dear node, cost spans only 1.0-1.1 and the cheap one keeps all of it:
    # .4 + .3 * .05 = .415 against .3.
    assert chosen(place(Request(resources=SMALL), [cheap_slow, fast])) == "cheap-slow"


def test_the_default_strategy_is_balanced_and_spreads() -> None:
    result = place(Request(resources=SMALL), [node("busy", cpu=1500), node("idle")])
    assert chosen(result) == "idle"
    assert isinstance(result, Placement)
    assert result.strategy == "balanced"
    assert dict(result.weights) == dict(zip(CRITERIA, PRESETS[Strategy.BALANCED], strict=True))


def test_high_availability_prefers_reliable_nodes() -> None:
    nodes = [node("flaky", reliability=0.5), node("solid", cpu=2000, reliability=0.99)]
    result = place(Request(resources=SMALL, strategy="high_availability"), nodes)
    assert chosen(result) == "solid"


def test_high_availability_spreads_replicas_over_zones_then_providers() -> None:
    nodes = [
        node("aws-a1", provider="aws", region="r", zone="a", reliability=1.0),
        node("aws-a2", provider="aws", region="r", zone="a", reliability=1.0),
        node("aws-b", provider="aws", region="r", zone="b", reliability=0.7),
        node("gcp-c", provider="gcp", region="s", zone="c", reliability=0.7),
    ]
    spread = Spread()
    zones = []
    for _ in range(3):
        req = Request(resources=SMALL, strategy="high_availability", spread_over=spread)
        result = place(req, nodes)
        assert isinstance(result, Placement)
        zones.append(result.domain)
        spread = spread.add(result)
    assert sorted(zones) == ["a", "b", "c"]
    # after one replica on aws zone a: gcp (new provider) beats aws zone b at equal merit
    assert zones[1] == "c"
    assert spread.zones == {"a": 1, "b": 1, "c": 1}
    assert spread.providers == {"aws": 2, "gcp": 1}


def test_custom_weights_and_locality() -> None:
    nodes = [
        node("eu", region="eu-west", perf_score=1.0),
        node("us", region="us-east", perf_score=2.0),
    ]
    fast = Request(resources=SMALL, strategy="custom", weights={"performance": 1})
    assert chosen(place(fast, nodes)) == "us"
    near = Request(
        resources=SMALL,
        strategy="custom",
        weights={"performance": 1, "locality": 3},
        near_region="eu-west",
    )
    result = place(near, nodes)
    assert chosen(result) == "eu"
    assert isinstance(result, Placement)
    assert result.breakdown["locality"] == 1.0
    assert result.weights["locality"] == 3.0


def test_a_strategy_given_to_place_overrides_the_requests() -> None:
    nodes = [
        node("cheap", price_per_hour=1.0, perf_score=1.0),
        node("fast", perf_score=3.0, price_per_hour=9.0),
    ]
    req = Request(resources=SMALL, strategy="lowest_cost")
    assert chosen(place(req, nodes)) == "cheap"
    assert chosen(place(req, nodes, strategy="best_performance")) == "fast"


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "weights", "field"),
    [
        ("custom", {"cost": -1}, "weights.cost"),
        ("custom", {"cost": 0, "load": 0.0}, "weights"),
        ("custom", {}, "weights"),
        ("custom", None, "weights"),
        ("custom", {"speed": 1}, "weights.speed"),
        ("custom", {"cost": float("nan")}, "weights.cost"),
        ("custom", {"cost": float("inf")}, "weights.cost"),
        ("custom", {"cost": "1"}, "weights.cost"),
        ("custom", {"cost": True}, "weights.cost"),
        ("balanced", {"cost": 1}, "weights"),
        ("cheapest", None, "strategy"),
    ],
)
def test_bad_policies_name_the_field(
    strategy: str, weights: dict[str, Any] | None, field: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        validate_policy(strategy, weights)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    with pytest.raises(ValueError, match=f"^{field}: "):
        Request(resources=SMALL, strategy=strategy, weights=weights)


def test_policy_messages_are_plain() -> None:
    with pytest.raises(PolicyError, match=r"^weights.cost: must be ≥ 0$"):
        validate_policy("custom", {"cost": -0.5})
    with pytest.raises(PolicyError, match=r"^weights: at least one weight must be > 0$"):
        validate_policy("custom", {"cost": 0})


def test_custom_weights_fill_unnamed_criteria_with_zero() -> None:
    assert validate_policy("custom", {"load": 2, "cost": 1}) == (
        Strategy.CUSTOM,
        (1.0, 0.0, 2.0, 0.0, 0.0),
    )
    assert validate_policy("lowest_cost") == (Strategy.LOWEST_COST, (1.0, 0.0, 0.05, 0.0, 0.0))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"max_price_per_hour": -1.0}, "max_price_per_hour"),
        ({"max_price_per_hour": float("nan")}, "max_price_per_hour"),
        ({"regions": "eu-west"}, "regions"),
        ({"countries": [1]}, "countries"),
    ],
)
def test_other_request_fields_are_checked(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Request(resources=SMALL, **kw)
    assert caught.value.field == field


def test_node_views_refuse_nonsense_economics() -> None:
    with pytest.raises(ValueError, match="perf_score"):
        node("x", perf_score=0)
    with pytest.raises(ValueError, match="reliability"):
        node("x", reliability=1.5)
    with pytest.raises(ValueError, match="price_per_hour"):
        node("x", price_per_hour=-1)


# -- breakdown and explanation ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", [s for s in Strategy if s is not Strategy.CUSTOM])
def test_the_breakdown_explains_the_score(strategy: Strategy) -> None:
    nodes = [
        node("a", price_per_hour=1.0, perf_score=1.0, reliability=0.9, cpu=3000),
        node("b", price_per_hour=2.0, perf_score=1.5, reliability=0.8),
        node("c", price_per_hour=3.0, perf_score=2.0, reliability=1.0, cpu=2000),
    ]
    result = place(Request(resources=SMALL, strategy=strategy), nodes)
    assert isinstance(result, Placement)
    assert set(CRITERIA) <= set(result.breakdown)
    assert all(0.0 <= result.breakdown[c] <= 1.0 for c in CRITERIA)
    assert tuple(result.weights[c] for c in CRITERIA) == PRESETS[strategy]
    total = sum(result.weights.values())
    expected = sum(result.weights[c] * result.breakdown[c] for c in CRITERIA) / total
    expected -= result.breakdown.get("spread_penalty", 0.0)
    assert result.score == pytest.approx(expected)
    assert ("spread_penalty" in result.breakdown) == (strategy is Strategy.HIGH_AVAILABILITY)
    assert result.candidates == 3
    assert result.unchecked == 0
    # runner-ups are the others, best first
    assert {a.target for a in result.runner_ups} == {"a", "b", "c"} - {result.node_id}
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["kind"] == "placement" and data["strategy"] == strategy.value


def test_runner_ups_are_ranked_after_the_winner() -> None:
    nodes = [node(f"n{i}", cpu=4000 - 300 * i) for i in range(6)]
    result = place(Request(resources=SMALL), nodes)
    assert isinstance(result, Placement)
    assert result.node_id == "n0"
    assert [a.target for a in result.runner_ups] == ["n1", "n2", "n3"]
    scores = [result.score] + [a.score for a in result.runner_ups]
    assert scores == sorted(scores, reverse=True)


# -- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(Strategy))
def test_same_inputs_same_answer_whatever_the_node_order(strategy: Strategy) -> None:
    rng = random.Random(5)
    nodes = [
        node(
            f"n{i:02d}",
            cpu=rng.choice((1000, 2000, 4000)),
            price_per_hour=rng.choice((1.0, 2.0)),
            perf_score=rng.choice((1.0, 2.0)),
            reliability=rng.choice((0.9, 1.0)),
            zone=rng.choice("abc"),
        )
        for i in range(30)
    ]
    weights = {"cost": 1, "reliability": 1} if strategy is Strategy.CUSTOM else None
    req = Request(resources=SMALL, strategy=strategy, weights=weights)
    first = place(req, nodes)
    for _ in range(5):
        rng.shuffle(nodes)
        assert place(req, nodes) == first
        assert place(req, nodes, sample=3, sample_size=4) == place(
            req, list(reversed(nodes)), sample=3, sample_size=4
        )


def test_full_ties_go_to_the_smaller_id() -> None:
    for strategy in Strategy:
        weights = {"cost": 1} if strategy is Strategy.CUSTOM else None
        req = Request(resources=SMALL, strategy=strategy, weights=weights)
        assert chosen(place(req, [node("z"), node("m"), node("q")])) == "m"


def test_a_spread_with_only_zones_counted_still_steers() -> None:
    nodes = [node("a", zone="z1"), node("b", zone="z2", cpu=2000)]
    req = Request(resources=SMALL, strategy="high_availability", spread_over=Spread({"z1": 1}))
    result = place(req, nodes)
    assert chosen(result) == "b"
    assert isinstance(result, Placement) and result.breakdown["spread_penalty"] == 0.0


def test_a_spread_with_only_providers_counted_still_steers() -> None:
    nodes = [node("a", provider="aws", zone="z1"), node("b", provider="gcp", zone="z2", cpu=3000)]
    req = Request(
        resources=SMALL, strategy="high_availability", spread_over=Spread(providers={"aws": 1})
    )
    assert chosen(place(req, nodes)) == "b"
