"""Placements per second of the pure scheduler, per strategy and fleet size.

    .venv/bin/python bench/placement.py [--sizes 100,1000,10000] [--placements 20000]
                                        [--seed 7] [--exhaustive] [--json PATH]

Builds a seeded, realistic random fleet (several clouds and regions with zones and
countries, on-demand and spot prices per instance size, GPU nodes tainted for GPU work, a few
nodes draining, free capacity anywhere from empty to full) and a fixed mix of requests: plain
cpu work of many sizes, work pinned to EU countries or to a list of regions, GPU work (with and
without a GPU type), spot-tolerant work under a price cap, work needing gVisor, and
high-availability replicas that already have some placed.

For each size it reports the index build (`Fleet(nodes)`) and the first placement of each
kind of request (which computes that kind's candidate set) separately, then, per strategy,
placements/s over closed loops (the best and the median of `--rounds`) and p50/p99 of single
placements timed one by one (the timer adds about 0.1 us to each). The
fleet is a snapshot: placements do not consume capacity, so every one is the same decision
problem. Weighted strategies sample (`sample=random.Random(seed)`) unless `--exhaustive`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import (
    Fleet,
    NodeView,
    Placement,
    Request,
    Spread,
    Strategy,
    Unschedulable,
    place,
)

# provider -> (price factor, {region: (country, zones)})
PROVIDERS: dict[str, tuple[float, dict[str, tuple[str, int]]]] = {
    "aws": (
        1.0,
        {
            "us-east-1": ("US", 4),
            "us-west-2": ("US", 3),
            "eu-west-1": ("IE", 3),
            "eu-central-1": ("DE", 3),
            "ap-northeast-1": ("JP", 3),
        },
    ),
    "gcp": (
        0.95,
        {
            "us-central1": ("US", 3),
            "europe-west4": ("NL", 3),
            "asia-east1": ("TW", 2),
        },
    ),
    "coreweave": (0.7, {"us-east-04": ("US", 1), "eu-south-01": ("ES", 1)}),
    "runpod": (0.6, {"us-ca-2": ("US", 1), "eu-ro-1": ("RO", 1)}),
    "onprem": (0.3, {"dc-paris": ("FR", 2)}),
}
SIZES_VCPU = (2, 4, 8, 16, 32, 64)
GPU_TYPES = {"l4": 0.8, "a10g": 1.2, "a100": 2.9, "h100": 4.5}
TIERS = (Tier.PROCESS, Tier.NAMESPACE, Tier.OCI, Tier.GVISOR, Tier.MICROVM)


def make_fleet(n: int, rng: random.Random) -> list[NodeView]:
    places = [
        (provider, factor, region, country, f"{region}{'abcd'[z]}")
        for provider, (factor, regions) in PROVIDERS.items()
        for region, (country, zones) in regions.items()
        for z in range(zones)
    ]
    nodes = []
    for k in range(n):
        provider, factor, region, country, zone = rng.choice(places)
        vcpu = rng.choice(SIZES_VCPU)
        capacity_kw: dict[str, Any] = {
            "cpu_millicores": vcpu * 1000,
            "memory_mib": vcpu * rng.choice((2048, 4096, 8192)),
            "disk_mib": vcpu * 20_000,
        }
        price = vcpu * 0.048 * factor * rng.uniform(0.9, 1.1)
        taints: dict[str, str] = {}
        if rng.random() < 0.12:
            gpu_type = rng.choice(list(GPU_TYPES))
            gpus = rng.choice((1, 2, 4, 8))
            capacity_kw.update(gpu_count=gpus, gpu_type=gpu_type)
            price += gpus * GPU_TYPES[gpu_type] * factor
            taints["nvidia.com/gpu"] = "present"
        capacity = Resources(**capacity_kw)
        used = rng.random() ** 0.7  # most nodes fairly busy, some empty
        free = Resources.model_construct(
            cpu_millicores=int(capacity.cpu_millicores * (1 - used)),
            memory_mib=int(capacity.memory_mib * (1 - used * rng.uniform(0.6, 1.0))),
            disk_mib=int(capacity.disk_mib * 0.8),
            gpu_count=int(capacity.gpu_count * rng.random()),
            gpu_type=capacity.gpu_type,
        )
        spot = provider in ("aws", "gcp") and rng.random() < 0.25
        runtimes = set(TIERS[: rng.choice((2, 3, 3, 4, 5))])
        nodes.append(
            NodeView(
                id=f"{provider}-{zone}-{k:06d}",
                capacity=capacity,
                free=free,
                runtimes=frozenset(runtimes),
                ready=rng.random() > 0.02,
                labels={"arch": "arm64" if rng.random() < 0.2 else "amd64"},
                region=region,
                provider=provider,
                zone=zone,
                country=country,
                price_per_hour=round(price, 4),
                spot=spot,
                spot_price_per_hour=round(price * rng.uniform(0.3, 0.45), 4) if spot else None,
                perf_score=round(rng.uniform(0.7, 1.5), 2),
                reliability=round(min(1.0, rng.betavariate(20, 1)), 3),
                taints=taints,
            )
        )
    return nodes


def make_requests(rng: random.Random) -> list[Request]:
    requests = []
    for _ in range(12):  # plain cpu work, many sizes
        cpu = rng.choice((100, 250, 500, 1000, 2000, 4000))
        requests.append(Request(resources=Resources(cpu_millicores=cpu, memory_mib=cpu * 2)))
    requests += [
        Request(resources=Resources(cpu_millicores=500), countries=("DE", "FR", "IE", "NL")),
        Request(resources=Resources(cpu_millicores=2000), regions=("us-east-1", "us-central1")),
        Request(
            resources=Resources(cpu_millicores=4000, memory_mib=16_384),
            regions=("eu-west-1", "europe-west4", "eu-central-1"),
            labels={"arch": "amd64"},
        ),
        Request(
            resources=Resources(cpu_millicores=2000, gpu_count=1),
            tolerations=frozenset({"nvidia.com/gpu"}),
        ),
        Request(
            resources=Resources(
                cpu_millicores=8000, memory_mib=32_768, gpu_count=2, gpu_type="h100"
            ),
            tolerations=frozenset({"nvidia.com/gpu"}),
        ),
        Request(resources=Resources(cpu_millicores=1000), spot=True, max_price_per_hour=0.05),
        Request(resources=Resources(cpu_millicores=500), min_isolation=Tier.GVISOR),
        Request(
            resources=Resources(cpu_millicores=1000),
            spread_over=Spread({"us-east-1a": 1, "eu-west-1b": 1}, {"aws": 2}),
        ),
    ]
    return requests


CUSTOM = {"cost": 0.5, "performance": 0.2, "reliability": 0.3}


def for_strategy(requests: list[Request], strategy: Strategy) -> list[Request]:
    weights = CUSTOM if strategy is Strategy.CUSTOM else None
    return [replace(r, strategy=strategy, weights=weights) for r in requests]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def measure(
    fleet: Fleet,
    requests: list[Request],
    placements: int,
    seed: int,
    exhaustive: bool,
    rounds: int,
) -> dict[str, Any]:
    """Throughput over `rounds` closed loops (best and median round: on a shared 2-core
    machine the best round is the one least disturbed), then single placements timed one by
    one for the percentiles."""
    rng = random.Random(seed)
    sample = None if exhaustive else rng
    m = len(requests)
    outcomes = {"placed": 0, "unschedulable": 0}
    for request in requests:
        result = place(request, fleet, sample=sample)
        if isinstance(result, Placement):
            outcomes["placed"] += 1
        elif isinstance(result, Unschedulable):
            outcomes["unschedulable"] += 1
    per_round = max(1, placements // rounds)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for k in range(per_round):
            place(requests[k % m], fleet, sample=sample)
        rates.append(per_round / (time.perf_counter() - start))
    single = []
    clock = time.perf_counter_ns
    for k in range(min(placements, 20_000)):
        request = requests[k % m]
        t0 = clock()
        place(request, fleet, sample=sample)
        single.append((clock() - t0) / 1000)
    return {
        "per_s_best": max(rates),
        "per_s_median": statistics.median(rates),
        "p50_us": percentile(single, 50),
        "p99_us": percentile(single, 99),
        "mean_us": statistics.fmean(single),
        **outcomes,
    }


def profile(fleet: Fleet, requests: list[Request], placements: int, seed: int) -> None:
    profiler = cProfile.Profile()
    rng = random.Random(seed)
    m = len(requests)
    profiler.enable()
    for k in range(placements):
        place(requests[k % m], fleet, sample=rng)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--placements", type=int, default=20_000, help="per strategy and size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--exhaustive", action="store_true", help="weighted strategies score every node"
    )
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per row")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile each strategy at the largest size"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    print(f"python {sys.version.split()[0]}; {'exhaustive' if args.exhaustive else 'sampled'}")
    for size in (int(s) for s in args.sizes.split(",")):
        rng = random.Random(args.seed)
        nodes = make_fleet(size, rng)
        base = make_requests(rng)
        t0 = time.perf_counter()
        fleet = Fleet(nodes)
        build_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        for strategy in Strategy:
            for request in for_strategy(base, strategy):
                place(request, fleet, sample=random.Random(0))
        warm_ms = (time.perf_counter() - t0) * 1000
        print(
            f"\n{size:,} nodes: index build {build_ms:.1f} ms; first placement of the "
            f"{len(base)} request kinds x {len(Strategy)} strategies {warm_ms:.1f} ms"
        )
        print(f"{'strategy':<18} {'best/s':>9} {'median/s':>9} {'p50 us':>7} {'p99 us':>7}  placed")
        for strategy in Strategy:
            figures = measure(
                fleet,
                for_strategy(base, strategy),
                args.placements,
                args.seed,
                args.exhaustive,
                args.rounds,
            )
            share = figures["placed"] / (figures["placed"] + figures["unschedulable"])
            print(
                f"{strategy.value:<18} {figures['per_s_best']:>9,.0f} "
                f"{figures['per_s_median']:>9,.0f} {figures['p50_us']:>7.1f} "
                f"{figures['p99_us']:>7.1f}  {share:.0%}"
            )
            rows.append(
                {
                    "nodes": size,
                    "strategy": strategy.value,
                    "build_ms": build_ms,
                    "warm_ms": warm_ms,
                    **figures,
                }
            )
        if args.profile and size == max(int(s) for s in args.sizes.split(",")):
            for strategy in Strategy:
                print(f"\n-- profile: {strategy.value}, {size:,} nodes")
                profile(fleet, for_strategy(base, strategy), args.placements, args.seed)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
