"""Offers: when no connected node fits, the answer is which machine to start, and why."""

from __future__ import annotations

import json
from typing import Any

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import (
    NodeView,
    Offer,
    Placement,
    Provision,
    Request,
    Spread,
    Unschedulable,
    place,
)

FULL = Resources.model_construct(
    cpu_millicores=0, memory_mib=0, disk_mib=0, gpu_count=0, gpu_type=None
)


def busy_node(node_id: str = "busy") -> NodeView:
    return NodeView(
        id=node_id,
        region="us-east-1",
        capacity=Resources(cpu_millicores=4000, memory_mib=8192),
        free=FULL,
        runtimes=frozenset({Tier.PROCESS}),
    )


def offer(instance_type: str, cpu: int, mem: int, price: float, **kw: Any) -> Offer:
    kw.setdefault("region", "us-east-1")
    return Offer(
        provider=kw.pop("provider", "aws"),
        instance_type=instance_type,
        cpu_millicores=cpu,
        memory_mib=mem,
        price_per_hour=price,
        **kw,
    )


CATALOG = [
    offer("m7i.large", 2000, 8192, 0.1008),
    offer("m7i.xlarge", 4000, 16_384, 0.2016),
    offer("c7i.4xlarge", 16_000, 32_768, 0.714, perf_score=1.6),
    offer("g5.xlarge", 4000, 16_384, 1.006, gpu_count=1, gpu_type="a10g"),
    offer("n2-standard-4", 4000, 16_384, 0.1942, provider="gcp", region="europe-west4"),
]
WORK = Resources(cpu_millicores=2000, memory_mib=4096)


def test_no_node_fits_so_the_cheapest_feasible_offer_is_provisioned() -> None:
    result = place(Request(resources=WORK, strategy="lowest_cost"), [busy_node()], CATALOG)
    assert isinstance(result, Provision), result
    # the cheapest machine that fits, by its whole price: a share of a bigger machine may
    # cost less per hour (c7i.4xlarge: 1/8 of 0.714), but starting it commits all of it
    assert result.offer.instance_type == "m7i.large"
    assert result.cost_per_hour == result.price_per_hour == pytest.approx(0.1008)
    assert result.spot is False
    assert result.reason == "no node fits; the cheapest feasible offer"
    assert result.rejected == {"with too little free cpu": 1}
    assert result.offer_rejected == {}
    assert result.breakdown["cost"] == 1.0
    assert "aws/m7i.large/us-east-1" in result.message
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["kind"] == "provision" and data["offer"]["name"] == "aws/m7i.large/us-east-1"


def test_offers_obey_the_same_hard_constraints() -> None:
    req = Request(
        resources=Resources(cpu_millicores=2000, memory_mib=4096, gpu_count=1, gpu_type="h100"),
        regions=("us-east-1",),
    )
    result = place(req, [busy_node()], CATALOG)
    assert isinstance(result, Unschedulable)
    assert result.rejected == {"with too few free gpus": 1}
    assert result.offer_rejected == {
        "outside the allowed regions": 1,
        "with too few gpus": 3,
        "without gpu type h100": 1,
    }
    assert result.message == (
        "no node can run it: with too few free gpus (1 node); no offer fits: "
        "outside the allowed regions (1 offer); with too few gpus (3 offers); "
        "without gpu type h100 (1 offer)"
    )


def test_offers_are_only_consulted_when_no_node_fits() -> None:
    free = NodeView(
        id="free",
        capacity=Resources(cpu_millicores=4000, memory_mib=8192),
        free=Resources(cpu_millicores=4000, memory_mib=8192),
        runtimes=frozenset({Tier.PROCESS}),
        price_per_hour=100.0,
    )
    result = place(Request(resources=WORK, strategy="lowest_cost"), [free], CATALOG)
    assert isinstance(result, Placement) and result.node_id == "free"


def test_spot_offers_only_when_allowed_and_then_the_cheaper_price() -> None:
    catalog = [offer("m7i.large", 2000, 8192, 0.1008, spot_price_per_hour=0.035), *CATALOG[1:]]
    on_demand = place(Request(resources=WORK, strategy="lowest_cost"), [], catalog)
    assert isinstance(on_demand, Provision) and on_demand.spot is False
    spot = place(Request(resources=WORK, strategy="lowest_cost", spot=True), [], catalog)
    assert isinstance(spot, Provision)
    assert (spot.offer.instance_type, spot.spot) == ("m7i.large", True)
    assert spot.price_per_hour == 0.035
    assert "(spot)" in spot.message


def test_max_price_and_runtimes_apply_to_offers() -> None:
    catalog = [
        offer("m7i.large", 2000, 8192, 0.1008),
        offer("metal", 16_000, 65_536, 2.0, runtimes=frozenset(Tier)),
    ]
    req = Request(resources=WORK, min_isolation=Tier.MICROVM, max_price_per_hour=1.99)
    result = place(req, [], catalog)
    assert isinstance(result, Unschedulable)
    assert result.offer_rejected == {
        "without a runtime of at least microvm": 1,
        "over the max price": 1,
    }
    result = place(
        Request(resources=WORK, min_isolation=Tier.MICROVM, max_price_per_hour=2.0), [], catalog
    )
    assert isinstance(result, Provision) and result.offer.instance_type == "metal"


def test_other_strategies_score_offers() -> None:
    fast = place(Request(resources=WORK, strategy="best_performance"), [], CATALOG)
    assert isinstance(fast, Provision)
    assert fast.offer.instance_type == "c7i.4xlarge"
    assert fast.reason == "no node fits; the fastest feasible offer"
    balanced = place(Request(resources=WORK), [], CATALOG)
    assert isinstance(balanced, Provision)
    assert balanced.reason == "no node fits; the best feasible offer by balanced"
    assert balanced.runner_ups and balanced.runner_ups[0].score <= balanced.score


def test_high_availability_provisions_in_another_zone() -> None:
    catalog = [
        offer("m7i.large", 2000, 8192, 0.1008, zone="us-east-1a"),
        offer("m7i.large", 2000, 8192, 0.1008, zone="us-east-1b"),
    ]
    req = Request(resources=WORK, strategy="high_availability")
    first = place(req, [], catalog)
    assert isinstance(first, Provision) and first.domain == "us-east-1a"
    second = place(
        Request(resources=WORK, strategy="high_availability", spread_over=Spread().add(first)),
        [],
        catalog,
    )
    assert isinstance(second, Provision) and second.domain == "us-east-1b"
    assert second.breakdown["spread_penalty"] == pytest.approx(1 / 2)


def test_offers_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="price_per_hour"):
        offer("x", 1000, 1024, -1.0)
    with pytest.raises(ValueError, match="cpu_millicores"):
        offer("x", 0, 1024, 1.0)
