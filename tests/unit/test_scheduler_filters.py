"""Hard constraints: each one turns a node away under its own reason, and only that one."""

from __future__ import annotations

from typing import Any

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import NodeView, Placement, Request, Unschedulable, place


def node(
    node_id: str, cpu: int = 4000, mem: int = 8192, gpus: int = 0, disk: int = 10_000, **kw: Any
) -> NodeView:
    gpu_type = kw.pop("gpu_type", "a100" if gpus else None)
    capacity = Resources(
        cpu_millicores=4000,
        memory_mib=8192,
        disk_mib=10_000,
        gpu_count=gpus,
        gpu_type=gpu_type,
    )
    free = Resources.model_construct(
        cpu_millicores=cpu, memory_mib=mem, disk_mib=disk, gpu_count=gpus, gpu_type=gpu_type
    )
    kw.setdefault("runtimes", frozenset({Tier.PROCESS}))
    return NodeView(id=node_id, capacity=capacity, free=free, **kw)


def request(**kw: Any) -> Request:
    kw.setdefault("resources", Resources(cpu_millicores=500, memory_mib=256))
    return Request(**kw)


def only_good_fits(req: Request, bad: NodeView, reason: str) -> None:
    """`bad` is refused with `reason`; a plain node beside it is chosen."""
    good = node(
        "good",
        region="eu",
        zone="eu-a",
        country="DE",
        labels={"disk": "ssd"},
        runtimes=frozenset(Tier),
        network_tiers=frozenset({Tier.NAMESPACE}),
    )
    result = place(req, [bad, good])
    assert isinstance(result, Placement), result
    assert result.node_id == "good"
    assert result.rejected == {reason: 1}
    alone = place(req, [bad])
    assert isinstance(alone, Unschedulable)
    assert alone.rejected == {reason: 1}
    assert f"{reason} (1 node)" in alone.message


@pytest.mark.parametrize(
    ("req", "bad", "reason"),
    [
        (
            request(regions=("eu",)),
            node("bad", region="us"),
            "outside the allowed regions",
        ),
        (
            request(zones=("eu-a",)),
            node("bad", region="eu", zone="eu-b"),
            "outside the allowed zones",
        ),
        (
            request(countries=("de", "FR")),
            node("bad", region="eu", country="NL"),
            "outside the allowed countries",
        ),
        (
            request(avoid_regions=frozenset({"us"})),
            node("bad", region="us"),
            "in a region to avoid",
        ),
        (request(), node("bad", ready=False), "not ready"),
        (
            request(isolation=Tier.OCI),
            node("bad", runtimes=frozenset({Tier.PROCESS})),
            "without runtime oci",
        ),
        (
            request(labels={"disk": "ssd"}),
            node("bad", labels={"disk": "hdd"}),
            "without label disk=ssd",
        ),
        (
            request(tolerations=frozenset({"other"})),
            node("bad", taints={"dedicated": "ml"}),
            "with taint dedicated=ml not tolerated",
        ),
        (request(), node("bad", spot=True), "spot not allowed"),
        (
            request(network=True),
            node("bad", runtimes=frozenset(Tier)),
            "without network in a usable tier",
        ),
        (
            request(avoid_nodes=frozenset({"bad"})),
            node("bad"),
            "where a previous attempt failed",
        ),
        (request(), node("bad", cpu=100), "with too little free cpu"),
        (request(), node("bad", mem=100), "with too little free memory"),
        (request(), node("bad", disk=100), "with too little free disk"),
        (
            # a quarter of a 4 USD/h node costs 1 USD/h
            request(resources=Resources(cpu_millicores=1000), max_price_per_hour=0.5),
            node("bad", price_per_hour=4.0),
            "over the max price",
        ),
    ],
)
def test_each_hard_constraint_rejects_with_its_reason(
    req: Request, bad: NodeView, reason: str
) -> None:
    only_good_fits(req, bad, reason)


def test_gpu_count_and_type() -> None:
    nodes = [node("cpu-only"), node("a100", gpus=2), node("h100", gpus=1, gpu_type="h100")]
    result = place(
        request(resources=Resources(gpu_count=1, gpu_type="h100")), nodes, strategy="balanced"
    )
    assert isinstance(result, Placement) and result.node_id == "h100"
    assert result.rejected == {"with too few free gpus": 1, "without gpu type h100": 1}
    result = place(request(resources=Resources(gpu_count=2)), nodes)
    assert isinstance(result, Placement) and result.node_id == "a100"
    assert result.rejected == {"with too few free gpus": 2}


def test_free_gpus_are_checked_not_just_installed_ones() -> None:
    busy = node("busy", gpus=4)
    busy = NodeView(
        id="busy",
        capacity=busy.capacity,
        free=busy.free.model_copy(update={"gpu_count": 0}),
        runtimes=busy.runtimes,
    )
    result = place(request(resources=Resources(gpu_count=1)), [busy])
    assert isinstance(result, Unschedulable)
    assert result.rejected == {"with too few free gpus": 1}


def test_a_tolerated_taint_admits_and_spot_needs_consent() -> None:
    tainted = node("gpu-box", taints={"nvidia.com/gpu": "present"})
    result = place(request(tolerations=frozenset({"nvidia.com/gpu"})), [tainted])
    assert isinstance(result, Placement)
    spot = node("spot", spot=True, price_per_hour=1.0, spot_price_per_hour=0.3)
    result = place(request(spot=True), [spot])
    assert isinstance(result, Placement)
    # billed at the spot price: 500m of 4000m is the largest share, 1/8 of 0.3
    assert result.cost_per_hour == pytest.approx(0.3 / 8)


def test_a_node_is_counted_once_under_its_first_failing_check() -> None:
    # outside the regions AND not ready AND too small: location comes first
    nodes = [node("a", region="us", ready=False, cpu=1), node("b", region="eu", cpu=1)]
    result = place(request(regions=("eu",)), nodes)
    assert isinstance(result, Unschedulable)
    assert result.rejected == {"outside the allowed regions": 1, "with too little free cpu": 1}
    assert sum(result.rejected.values()) == len(nodes)


def test_max_price_is_for_the_requested_share_not_the_node() -> None:
    # 1 USD/h for the whole node; half the node costs 0.5 USD/h
    big = node("big", price_per_hour=1.0)
    half = Resources(cpu_millicores=2000, memory_mib=1024)
    assert isinstance(place(request(resources=half, max_price_per_hour=0.5), [big]), Placement)
    assert isinstance(place(request(resources=half, max_price_per_hour=0.49), [big]), Unschedulable)


@pytest.mark.parametrize(
    ("isolation", "minimum", "network_tiers", "fits"),
    [
        (None, None, set(), False),
        (None, None, {Tier.NAMESPACE}, True),
        (Tier.NAMESPACE, None, {Tier.NAMESPACE}, True),
        (Tier.OCI, None, {Tier.NAMESPACE}, False),
        (None, Tier.NAMESPACE, {Tier.NAMESPACE}, True),
        (None, Tier.OCI, {Tier.NAMESPACE}, False),
    ],
)
def test_network_needs_a_tier_the_work_may_use(
    isolation: Tier | None, minimum: Tier | None, network_tiers: set[Tier], fits: bool
) -> None:
    box = node("box", runtimes=frozenset(Tier), network_tiers=frozenset(network_tiers))
    req = request(network=True, isolation=isolation, min_isolation=minimum)
    assert isinstance(place(req, [box]), Placement) is fits
    # without asking for network, the same node is fine
    assert isinstance(place(request(isolation=isolation, min_isolation=minimum), [box]), Placement)
