"""Properties of `place`, checked against a brute-force oracle written here from the rules
in DESIGN §5, independently of the scheduler's own filter code.

Small fleets come from hypothesis directly; large ones (hundreds of nodes) from a seeded
generator, so that the index, the cheapest-first scan and sampling all get exercised.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import (
    Fleet,
    NodeView,
    Offer,
    Placement,
    Provision,
    Request,
    Spread,
    Strategy,
    Unschedulable,
    place,
)

REGIONS = {"eu-1": "DE", "eu-2": "FR", "us-1": "US"}
GPU_TYPES = ("a100", "h100")
PRICES = (0.0, 0.5, 1.0, 1.0, 2.0, 3.5)  # repeated values make ties common

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LARGE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the oracle ------------------------------------------------------------------------------


def share(want: Resources, cpu: int, mem: int, gpus: int) -> float:
    parts = [want.cpu_millicores / cpu, want.memory_mib / mem]
    if want.gpu_count:
        parts.append(want.gpu_count / gpus)
    return max(parts)


def node_price(n: NodeView) -> float:
    if n.spot and n.spot_price_per_hour is not None:
        return n.spot_price_per_hour
    return n.price_per_hour


def node_cost(req: Request, n: NodeView) -> float:
    cap = n.capacity
    return node_price(n) * share(req.resources, cap.cpu_millicores, cap.memory_mib, cap.gpu_count)


def tiers_ok(req: Request, runtimes: frozenset[Tier]) -> bool:
    if req.isolation is not None and req.isolation not in runtimes:
        return False
    order = list(Tier)
    return req.min_isolation is None or any(
        order.index(t) >= order.index(req.min_isolation) for t in runtimes
    )


def network_ok(req: Request, network_tiers: frozenset[Tier]) -> bool:
    """Some tier the work may run in gives network (when the work asks for it)."""
    if not req.network:
        return True
    return any(tiers_ok(replace(req, network=False), frozenset({tier})) for tier in network_tiers)


def place_ok(req: Request, region: str | None, zone: str | None, country: str | None) -> bool:
    return (
        (not req.regions or region in req.regions)
        and (not req.zones or zone in req.zones)
        and (not req.countries or (country or "").upper() in {c.upper() for c in req.countries})
        and region not in req.avoid_regions
    )


def feasible(req: Request, n: NodeView) -> bool:
    want, free = req.resources, n.free
    return (
        place_ok(req, n.region, n.zone, n.country)
        and n.ready
        and tiers_ok(req, n.runtimes)
        and network_ok(req, n.network_tiers)
        and all(n.labels.get(k) == v for k, v in req.labels.items())
        and set(n.taints) <= set(req.tolerations)
        and (req.spot or not n.spot)
        and n.id not in req.avoid_nodes
        and free.cpu_millicores >= want.cpu_millicores
        and free.memory_mib >= want.memory_mib
        and free.disk_mib >= want.disk_mib
        and free.gpu_count >= want.gpu_count
        and (want.gpu_type is None or n.capacity.gpu_type == want.gpu_type)
        and (req.max_price_per_hour is None or node_cost(req, n) <= req.max_price_per_hour)
    )


def offer_feasible(req: Request, o: Offer) -> bool:
    want = req.resources
    prices = [o.price_per_hour]
    if req.spot and o.spot_price_per_hour is not None:
        prices.append(o.spot_price_per_hour)
    return (
        place_ok(req, o.region, o.zone, o.country)
        and tiers_ok(req, o.runtimes)
        and network_ok(req, o.runtimes if o.network_tiers is None else o.network_tiers)
        and all(o.labels.get(k) == v for k, v in req.labels.items())
        and o.cpu_millicores >= want.cpu_millicores
        and o.memory_mib >= want.memory_mib
        and (o.disk_mib is None or o.disk_mib >= want.disk_mib)
        and o.gpu_count >= want.gpu_count
        and (want.gpu_type is None or o.gpu_type == want.gpu_type)
        and (req.max_price_per_hour is None or min(prices) <= req.max_price_per_hour)
    )


# -- generators ------------------------------------------------------------------------------


def make_node(rng: random.Random, i: int, smooth: bool = False) -> NodeView:
    region = rng.choice(list(REGIONS))
    gpus = rng.choice((0, 0, 0, 1, 2, 4))
    gpu_type = rng.choice(GPU_TYPES) if gpus else None
    cap_cpu = rng.choice((1000, 2000, 4000, 8000, 16_000))
    cap_mem = rng.choice((1024, 4096, 16_384, 65_536))
    capacity = Resources(
        cpu_millicores=cap_cpu,
        memory_mib=cap_mem,
        disk_mib=50_000,
        gpu_count=gpus,
        gpu_type=gpu_type,
    )
    free = Resources.model_construct(
        cpu_millicores=rng.randint(0, cap_cpu),
        memory_mib=rng.randint(0, cap_mem),
        disk_mib=rng.choice((0, 10_000, 50_000)),
        gpu_count=rng.randint(0, gpus),
        gpu_type=gpu_type,
    )
    spot = rng.random() < 0.2
    runtimes = frozenset(rng.sample(list(Tier), rng.randint(1, 3)))
    return NodeView(
        id=f"n{i:04d}",
        capacity=capacity,
        free=free,
        runtimes=runtimes,
        network_tiers=frozenset(t for t in runtimes if rng.random() < 0.5),
        ready=rng.random() > 0.05,
        labels={"pool": rng.choice("xy")},
        region=region,
        provider=rng.choice(("aws", "gcp", "own")),
        zone=f"{region}{rng.choice('ab')}",
        country=REGIONS[region],
        # smooth prices: no ties, and no free nodes that are trivially the cheapest
        price_per_hour=rng.uniform(0.1, 4.0) if smooth else rng.choice(PRICES),
        spot=spot,
        spot_price_per_hour=rng.choice((None, 0.2, 0.4)) if spot else None,
        perf_score=rng.choice((0.5, 1.0, 2.0)),
        reliability=rng.choice((0.5, 0.9, 1.0)),
        taints={"gpu": "yes"} if gpus and rng.random() < 0.5 else {},
    )


def make_offer(rng: random.Random, i: int) -> Offer:
    region = rng.choice(list(REGIONS))
    gpus = rng.choice((0, 0, 1, 8))
    return Offer(
        provider=rng.choice(("aws", "gcp")),
        instance_type=f"t{i}",
        region=region,
        zone=f"{region}{rng.choice('ab')}",
        country=REGIONS[region],
        cpu_millicores=rng.choice((2000, 8000, 32_000)),
        memory_mib=rng.choice((4096, 32_768, 131_072)),
        disk_mib=rng.choice((None, 20_000)),
        gpu_count=gpus,
        gpu_type=rng.choice(GPU_TYPES) if gpus else None,
        price_per_hour=rng.choice((0.1, 0.4, 1.0, 4.0)),
        spot_price_per_hour=rng.choice((None, 0.05, 0.3)),
        runtimes=frozenset(rng.sample(list(Tier), rng.randint(1, 5))),
        labels={"pool": rng.choice("xy")},
        perf_score=rng.choice((1.0, 1.5)),
        network_tiers=rng.choice((None, frozenset(), frozenset({Tier.NAMESPACE}))),
    )


@st.composite
def requests(draw: st.DrawFn, ids: Sequence[str] = ()) -> Request:
    gpus = draw(st.sampled_from((0, 0, 0, 1, 2)))
    resources = Resources(
        cpu_millicores=draw(st.sampled_from((100, 500, 1000, 4000, 9000))),
        memory_mib=draw(st.sampled_from((64, 512, 2048, 8192))),
        disk_mib=draw(st.sampled_from((0, 1024, 20_000))),
        gpu_count=gpus,
        gpu_type=draw(st.none() | st.sampled_from(GPU_TYPES)) if gpus else None,
    )
    tier = draw(st.none() | st.sampled_from(list(Tier)))
    exact = draw(st.booleans())
    return Request(
        resources=resources,
        isolation=tier if exact else None,
        min_isolation=None if exact else tier,
        labels=draw(st.sampled_from(({}, {}, {"pool": "x"}))),
        regions=tuple(draw(st.sets(st.sampled_from(list(REGIONS)), max_size=2))),
        zones=tuple(draw(st.sampled_from(((), (), ("eu-1a", "us-1b"))))),
        countries=tuple(draw(st.sampled_from(((), (), ("de", "US"))))),
        tolerations=draw(st.sampled_from((frozenset(), frozenset({"gpu"})))),
        max_price_per_hour=draw(st.none() | st.sampled_from((0.05, 0.3, 1.0))),
        spot=draw(st.booleans()),
        avoid_nodes=frozenset(draw(st.sets(st.sampled_from(list(ids) or ["none"]), max_size=3))),
        avoid_regions=frozenset(draw(st.sets(st.sampled_from(list(REGIONS)), max_size=1))),
        network=draw(st.booleans()),
    )


def with_strategy(req: Request, strategy: Strategy) -> Request:
    weights = {"cost": 1.0, "reliability": 2.0} if strategy is Strategy.CUSTOM else None
    return replace(req, strategy=strategy, weights=weights)


small_fleets = st.builds(
    lambda seed, n: [make_node(random.Random(seed * 1000 + i), i) for i in range(n)],
    st.integers(0, 10**6),
    st.integers(0, 25),
)
large_fleets = st.builds(
    lambda seed, n, smooth: [
        make_node(random.Random(seed * 100_000 + i), i, smooth) for i in range(n)
    ],
    st.integers(0, 10**6),
    st.integers(200, 600),
    st.booleans(),
)
samples = st.none() | st.integers(0, 2**32)


# -- properties ------------------------------------------------------------------------------


def cheapest_is_chosen(nodes: list[NodeView], req: Request, result: object) -> None:
    costs = [node_cost(req, n) for n in nodes if feasible(req, n)]
    if not costs:
        assert isinstance(result, Unschedulable)
        return
    assert isinstance(result, Placement)
    chosen = next(n for n in nodes if n.id == result.node_id)
    assert feasible(req, chosen)
    assert math.isclose(node_cost(req, chosen), min(costs), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(result.cost_per_hour, min(costs), rel_tol=1e-9, abs_tol=1e-12)


@FAST
@given(small_fleets, st.data(), samples)
def test_lowest_cost_is_the_cheapest_feasible_share(
    nodes: list[NodeView], data: st.DataObject, sample: int | None
) -> None:
    req = with_strategy(data.draw(requests([n.id for n in nodes])), Strategy.LOWEST_COST)
    cheapest_is_chosen(nodes, req, place(req, nodes, sample=sample, sample_size=3))


@LARGE
@given(large_fleets, st.data(), samples)
def test_lowest_cost_is_the_cheapest_in_large_sampled_fleets(
    nodes: list[NodeView], data: st.DataObject, sample: int | None
) -> None:
    fleet = Fleet(nodes)
    req = with_strategy(data.draw(requests([n.id for n in nodes])), Strategy.LOWEST_COST)
    cheapest_is_chosen(nodes, req, place(req, fleet, sample=sample))
    # a plain request too, where most of the fleet is feasible
    plain = Request(resources=Resources(cpu_millicores=500, memory_mib=256), strategy="lowest_cost")
    cheapest_is_chosen(nodes, plain, place(plain, fleet, sample=random.Random(sample)))


@FAST
@given(
    small_fleets,
    st.data(),
    st.sampled_from(list(Strategy)),
    samples,
    st.integers(0, 6).map(lambda n: [make_offer(random.Random(n * 7 + i), i) for i in range(n)]),
)
def test_no_answer_breaks_a_hard_constraint_and_unschedulable_means_nothing_fits(
    nodes: list[NodeView],
    data: st.DataObject,
    strategy: Strategy,
    sample: int | None,
    offers: list[Offer],
) -> None:
    req = with_strategy(data.draw(requests([n.id for n in nodes])), strategy)
    result = place(req, nodes, offers, sample=sample, sample_size=2)
    any_node = any(feasible(req, n) for n in nodes)
    any_offer = any(offer_feasible(req, o) for o in offers)
    if isinstance(result, Placement):
        assert feasible(req, next(n for n in nodes if n.id == result.node_id))
    elif isinstance(result, Provision):
        assert not any_node
        assert offer_feasible(req, result.offer)
        assert not result.spot or req.spot
        limit = req.max_price_per_hour
        assert limit is None or result.price_per_hour <= limit
    else:
        assert not any_node and not any_offer
        # every node and every offer is accounted for
        assert sum(result.rejected.values()) == len(nodes)
        assert sum(result.offer_rejected.values()) == len(offers)
    if any_node:
        assert isinstance(result, Placement)


@LARGE
@given(large_fleets, st.data(), st.sampled_from(list(Strategy)), samples)
def test_no_hard_constraint_breaks_in_large_fleets(
    nodes: list[NodeView], data: st.DataObject, strategy: Strategy, sample: int | None
) -> None:
    req = with_strategy(data.draw(requests([n.id for n in nodes])), strategy)
    result = place(req, Fleet(nodes), sample=sample)
    if isinstance(result, Placement):
        assert feasible(req, next(n for n in nodes if n.id == result.node_id))
    else:
        assert not any(feasible(req, n) for n in nodes)


def spread_replicas(
    nodes: list[NodeView], base: Request, count: int, sample: int | None, consume: bool
) -> None:
    fleet = Fleet(nodes)
    current = {n.id: n for n in nodes}
    spread = Spread()
    rng = None if sample is None else random.Random(sample)
    for _ in range(count):
        req = replace(base, spread_over=spread)
        options = [n for n in current.values() if feasible(req, n)]
        result = place(req, fleet, sample=rng, sample_size=2)
        if not options:
            assert isinstance(result, Unschedulable)
            return
        assert isinstance(result, Placement)
        # never beside a replica while a less used zone had a feasible node
        uses = {n.id: spread.zones.get(n.zone or "", 0) for n in options}
        assert uses[result.node_id] == min(uses.values())
        spread = spread.add(result)
        if consume:
            n = current[result.node_id]
            n = replace(n, free=n.free.minus(req.resources))
            current[n.id] = n
            fleet.update(n)


@FAST
@given(small_fleets, st.integers(1, 8), samples, st.booleans())
def test_high_availability_spreads_over_zones(
    nodes: list[NodeView], count: int, sample: int | None, consume: bool
) -> None:
    base = Request(
        resources=Resources(cpu_millicores=100, memory_mib=64, disk_mib=0),
        strategy="high_availability",
        spot=True,
        tolerations=frozenset({"gpu"}),
    )
    spread_replicas(nodes, base, count, sample, consume)
    if consume:
        return
    # with capacity untouched: N replicas use min(N, zones with a feasible node) zones
    zones = {n.zone for n in nodes if feasible(base, n)}
    fleet, spread = Fleet(nodes), Spread()
    for _ in range(count):
        result = place(replace(base, spread_over=spread), fleet, sample=sample, sample_size=2)
        if not zones:
            assert isinstance(result, Unschedulable)
            return
        assert isinstance(result, Placement)
        spread = spread.add(result)
    assert len(spread.zones) == min(count, len(zones))


@LARGE
@given(large_fleets, st.integers(2, 8), samples)
def test_high_availability_spreads_in_large_sampled_fleets(
    nodes: list[NodeView], count: int, sample: int | None
) -> None:
    base = Request(
        resources=Resources(cpu_millicores=500, memory_mib=256, disk_mib=0),
        strategy="high_availability",
    )
    spread_replicas(nodes, base, count, sample, consume=True)
