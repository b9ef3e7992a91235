"""One rule prices work (`treadle.domain.pricing`): what the scheduler ranks a node by is what
Weaver charges, spot prices included, and a paused sandbox pays for its memory alone."""

from __future__ import annotations

import math
import random

import pytest

from property.test_placement_properties import make_node
from treadle.domain import pricing
from treadle.domain.resources import Resources
from treadle.scheduler import Placement, Request, place

NODE = Resources(cpu_millicores=4000, memory_mib=8192, gpu_count=2)


def test_the_share_is_the_largest_of_cpu_memory_and_gpus_at_most_all() -> None:
    assert pricing.share(Resources(cpu_millicores=1000, memory_mib=1024), NODE) == 0.25
    assert pricing.share(Resources(cpu_millicores=500, memory_mib=4096), NODE) == 0.5
    assert pricing.share(Resources(cpu_millicores=100, memory_mib=64, gpu_count=1), NODE) == 0.5
    assert pricing.share(Resources(cpu_millicores=8000, memory_mib=64), NODE) == 1.0
    # Paused: its memory only.
    paused = pricing.share(Resources(cpu_millicores=4000, memory_mib=2048), NODE, paused=True)
    assert paused == 0.25


def test_a_spot_node_is_billed_at_its_spot_price() -> None:
    assert pricing.node_price(2.0, spot=True, spot_price_per_hour=0.5) == 0.5
    assert pricing.node_price(2.0, spot=True, spot_price_per_hour=None) == 2.0
    assert pricing.node_price(2.0, spot=False, spot_price_per_hour=0.5) == 2.0
    # Half the node for 30 minutes of an $0.50 hour.
    assert pricing.cost(0.5, 0.5, 1800) == pytest.approx(0.125)
    assert pricing.cost(0.5, 0.5, -1) == 0.0


def test_what_the_scheduler_ranks_by_is_what_is_charged() -> None:
    rng = random.Random(7)
    nodes = [make_node(rng, i) for i in range(200)]
    by_id = {node.id: node for node in nodes}
    checked = 0
    for _ in range(300):
        resources = Resources(
            cpu_millicores=rng.choice((100, 500, 1000, 2000)),
            memory_mib=rng.choice((64, 256, 1024, 4096)),
            gpu_count=rng.choice((0, 0, 0, 1)),
        )
        placed = place(Request(resources=resources, spot=True, strategy="lowest_cost"), nodes)
        if not isinstance(placed, Placement):
            continue
        node = by_id[placed.node_id]
        price = pricing.node_price(node.price_per_hour, node.spot, node.spot_price_per_hour)
        charged = price * pricing.share(resources, node.capacity)
        assert math.isclose(placed.cost_per_hour, charged, rel_tol=1e-9, abs_tol=1e-12)
        checked += 1
    assert checked > 100
