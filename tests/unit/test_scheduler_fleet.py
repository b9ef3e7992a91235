"""The fleet index: reuse across placements, updates, and the bounded (sampled) regime."""

from __future__ import annotations

import random
from typing import Any

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import (
    Fleet,
    NodeView,
    Placement,
    PolicyError,
    Request,
    Spread,
    Strategy,
    Unschedulable,
    default_sample_size,
    place,
)

CAP = Resources(cpu_millicores=4000, memory_mib=8192, disk_mib=10_000)


def node(node_id: str, cpu: int = 4000, **kw: Any) -> NodeView:
    free = Resources.model_construct(
        cpu_millicores=cpu, memory_mib=8192, disk_mib=10_000, gpu_count=0, gpu_type=None
    )
    kw.setdefault("runtimes", frozenset({Tier.PROCESS}))
    return NodeView(id=node_id, capacity=CAP, free=free, **kw)


def placed(result: object) -> Placement:
    assert isinstance(result, Placement), result
    return result


def fleet_of(n: int, seed: int = 1) -> list[NodeView]:
    rng = random.Random(seed)
    return [
        node(
            f"n{i:05d}",
            cpu=rng.randrange(0, 4001, 250),
            price_per_hour=rng.choice((0.5, 1.0, 1.5, 2.0)) * rng.uniform(0.9, 1.1),
            perf_score=rng.choice((1.0, 1.5, 2.0)),
            reliability=rng.uniform(0.8, 1.0),
            region=f"r{i % 3}",
            zone=f"r{i % 3}-{'abc'[i % 7 % 3]}",
        )
        for i in range(n)
    ]


WORK = Resources(cpu_millicores=1000, memory_mib=512)


def test_a_fleet_answers_like_a_plain_list() -> None:
    nodes = fleet_of(60)
    fleet = Fleet(nodes)
    assert len(fleet) == 60 and "n00003" in fleet and fleet.get("nope") is None
    for strategy in Strategy:
        weights = {"cost": 1, "load": 1} if strategy is Strategy.CUSTOM else None
        req = Request(resources=WORK, strategy=strategy, weights=weights)
        assert place(req, fleet) == place(req, nodes)


def test_updates_of_free_capacity_are_seen() -> None:
    fleet = Fleet([node("a", cpu=3000), node("b", cpu=2000)])
    req = Request(resources=WORK)
    assert isinstance(result := place(req, fleet), Placement) and result.node_id == "a"
    fleet.update(node("a", cpu=500))
    result = place(req, fleet)
    assert isinstance(result, Placement) and result.node_id == "b"
    assert result.rejected == {"with too little free cpu": 1}


def test_other_changes_rebuild_the_index() -> None:
    fleet = Fleet([node("a"), node("b")])
    req = Request(resources=WORK, labels={"pool": "x"})
    assert isinstance(place(req, fleet), Unschedulable)
    fleet.update(node("b", labels={"pool": "x"}))
    assert isinstance(result := place(req, fleet), Placement) and result.node_id == "b"
    fleet.update(node("c", labels={"pool": "x"}, cpu=4000))
    fleet.update(node("b", labels={"pool": "x"}, cpu=1000))
    assert isinstance(result := place(req, fleet), Placement) and result.node_id == "c"
    fleet.remove("c")
    assert "c" not in fleet
    assert isinstance(result := place(req, fleet), Placement) and result.node_id == "b"
    cheap = Request(resources=WORK, strategy="lowest_cost")
    fleet.update(node("a", price_per_hour=5.0))
    assert isinstance(result := place(cheap, fleet), Placement) and result.node_id == "b"


def test_sampling_bounds_the_work_and_is_repeatable() -> None:
    fleet = Fleet(fleet_of(2000))
    req = Request(resources=WORK)
    exhaustive = place(req, fleet)
    assert isinstance(exhaustive, Placement) and exhaustive.unchecked == 0
    sampled = place(req, fleet, sample=11)
    assert isinstance(sampled, Placement)
    assert sampled.candidates == default_sample_size(2000) == 11
    assert sampled.unchecked > 1500
    assert place(req, fleet, sample=11) == sampled
    assert place(req, fleet, sample=random.Random(11)) == sampled
    assert placed(place(req, fleet, sample=11, sample_size=40)).candidates == 40
    # different draws land on different nodes
    chosen = {placed(place(req, fleet, sample=seed)).node_id for seed in range(20)}
    assert len(chosen) > 5


def test_sampled_lowest_cost_is_still_the_cheapest() -> None:
    nodes = fleet_of(3000)
    fleet = Fleet(nodes)
    req = Request(resources=WORK, strategy="lowest_cost")
    exact = place(req, fleet)
    fast = place(req, fleet, sample=random.Random(3))
    assert isinstance(exact, Placement) and isinstance(fast, Placement)
    assert fast.cost_per_hour == exact.cost_per_hour
    assert fast.unchecked > 2000  # the scan stopped early


def test_sampled_best_performance_is_still_the_fastest() -> None:
    fleet = Fleet(fleet_of(3000))
    req = Request(resources=WORK, strategy="best_performance")
    result = placed(place(req, fleet, sample=5))
    best = fleet.get(result.node_id)
    assert best is not None and best.perf_score == 2.0


def test_a_free_fleet_ties_everywhere_and_sampling_stops_early() -> None:
    fleet = Fleet([node(f"n{i:04d}") for i in range(1000)])
    req = Request(resources=WORK, strategy="lowest_cost")
    result = place(req, fleet, sample=1, sample_size=8)
    assert isinstance(result, Placement)
    assert result.candidates == 8 and result.unchecked == 992


def test_unschedulable_counts_are_complete_even_when_sampling() -> None:
    nodes = fleet_of(500)
    big = Request(resources=Resources(cpu_millicores=4001, memory_mib=512))
    for strategy in Strategy:
        weights = {"cost": 1} if strategy is Strategy.CUSTOM else None
        req = Request(resources=big.resources, strategy=strategy, weights=weights)
        result = place(req, Fleet(nodes), sample=2)
        assert result == Unschedulable({"with too little free cpu": 500})


def test_sampled_high_availability_still_spreads() -> None:
    fleet = Fleet(fleet_of(3000))
    spread = Spread()
    for _ in range(9):
        req = Request(resources=WORK, strategy="high_availability", spread_over=spread)
        result = place(req, fleet, sample=random.Random(7), sample_size=2)
        assert isinstance(result, Placement)
        spread = spread.add(result)
    # 9 zones in the fleet: one replica each
    assert sorted(spread.zones.values()) == [1] * 9


def test_bad_sampling_arguments() -> None:
    with pytest.raises(PolicyError, match="sample_size"):
        place(Request(resources=WORK), [node("a")], sample=1, sample_size=0)
    with pytest.raises(TypeError):
        place(Request(resources=WORK), [node("a")], sample="seed")  # type: ignore[arg-type]
