"""The three searches behind `place`: cheapest first, fastest first, and a walk (whole, or
sampled from a random point). Each checks the capacity-dependent constraints of the nodes it
reaches, counts why it turned nodes away, and hands the feasible ones, with their costs, to
scoring. See `treadle.scheduler.place` for when each one runs.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Protocol

from treadle.scheduler.filters import (
    AVOIDED_NODE,
    OVER_PRICE,
    TOO_FEW_GPUS,
    TOO_LITTLE_CPU,
    TOO_LITTLE_DISK,
    TOO_LITTLE_MEMORY,
)
from treadle.scheduler.fleet import Candidates, Fleet
from treadle.scheduler.request import Request

__all__ = ["Scan", "SupportsRandom", "cheapest", "default_sample_size", "fastest", "walk"]


class SupportsRandom(Protocol):
    """What sampling needs of a generator: `random.Random` or anything with `random()`."""

    def random(self) -> float: ...


@lru_cache(maxsize=1024)
def default_sample_size(candidates: int) -> int:
    """How many feasible nodes a sampled placement compares: `max(2, ⌈log₂ N⌉)` (Nomad)."""
    return max(2, math.ceil(math.log2(candidates))) if candidates > 1 else 2


def _why_not(fleet: Fleet, i: int, need: tuple[int, int, int, int], avoid: frozenset[str]) -> str:
    """The first dynamic check node `i` fails (the caller knows it fails one)."""
    if avoid and fleet.ids[i] in avoid:
        return AVOIDED_NODE
    row = fleet.rows[i]
    if row[0] < need[0]:
        return TOO_LITTLE_CPU
    if row[1] < need[1]:
        return TOO_LITTLE_MEMORY
    if row[2] < need[2]:
        return TOO_LITTLE_DISK
    if row[3] < need[3]:
        return TOO_FEW_GPUS
    return OVER_PRICE


class Scan:
    """What a search found: feasible positions with their costs, dynamic rejections, and how
    many candidates it checked."""

    __slots__ = ("checked", "costs", "feasible", "rejected")

    def __init__(self) -> None:
        self.feasible: list[int] = []
        self.costs: list[float] = []
        self.rejected: dict[str, int] = {}
        self.checked = 0


def cheapest(
    fleet: Fleet,
    cand: Candidates,
    need: tuple[int, int, int, int],
    avoid: frozenset[str],
    limit: float,
    ties: int | None,
) -> Scan:
    rc, rm, rd, rg = need
    mean = cand.mean_capacity()
    # Scan by the unit price of the resource this request takes the largest share of on a
    # typical node: that bound is the tightest, so the scan stops soonest.
    fractions = [rc / mean[0] if mean[0] else 0.0, rm / mean[1] if mean[1] else 0.0]
    if rg:
        fractions.append(rg / mean[2] if mean[2] else 0.0)
    dim = fractions.index(max(fractions))
    amount = (rc, rm, rg)[dim]
    units, order = cand.by_unit_price(dim)
    rows, ids = fleet.rows, fleet.ids
    scan = Scan()
    feasible, costs = scan.feasible, scan.costs
    best = math.inf
    tied = 0
    j = 0
    for j in range(len(order)):
        bound = amount * units[j]
        if bound > best:
            break
        i = order[j]
        r = rows[i]  # see `fleet.Row` for the layout
        if (
            r[0] >= rc
            and r[1] >= rm
            and r[2] >= rd
            and r[3] >= rg
            and not (avoid and ids[i] in avoid)
        ):
            cost = rc * r[4]
            other = rm * r[5]
            if other > cost:
                cost = other
            if rg:
                other = rg * r[6]
                if other > cost:
                    cost = other
            if cost <= limit:
                feasible.append(i)
                costs.append(cost)
                if cost < best:
                    best, tied = cost, 1
                elif cost == best:
                    tied += 1
                else:
                    continue
                # Everything after costs at least `bound`; once that is the best cost,
                # nothing cheaper remains and enough equals have been seen.
                if ties is not None and tied >= ties and bound == best:
                    j += 1
                    break
                continue
        reason = _why_not(fleet, i, need, avoid)
        scan.rejected[reason] = scan.rejected.get(reason, 0) + 1
    else:
        j = len(order)
    scan.checked = j
    return scan


def fastest(
    fleet: Fleet,
    cand: Candidates,
    need: tuple[int, int, int, int],
    avoid: frozenset[str],
    limit: float,
    ties: int | None,
) -> Scan:
    rc, rm, rd, rg = need
    speeds, order = cand.by_speed()
    rows, ids = fleet.rows, fleet.ids
    scan = Scan()
    feasible, costs = scan.feasible, scan.costs
    best = 0.0
    j = 0
    for j in range(len(order)):
        if speeds[j] < best:
            break
        i = order[j]
        r = rows[i]  # see `fleet.Row` for the layout
        if (
            r[0] >= rc
            and r[1] >= rm
            and r[2] >= rd
            and r[3] >= rg
            and not (avoid and ids[i] in avoid)
        ):
            cost = rc * r[4]
            other = rm * r[5]
            if other > cost:
                cost = other
            if rg:
                other = rg * r[6]
                if other > cost:
                    cost = other
            if cost <= limit:
                feasible.append(i)
                costs.append(cost)
                best = speeds[j]
                if ties is not None and len(feasible) >= ties:
                    j += 1
                    break
                continue
        reason = _why_not(fleet, i, need, avoid)
        scan.rejected[reason] = scan.rejected.get(reason, 0) + 1
    else:
        j = len(order)
    scan.checked = j
    return scan


def walk(
    fleet: Fleet,
    cand: Candidates,
    request: Request,
    need: tuple[int, int, int, int],
    limit: float,
    rng: SupportsRandom | None,
    enough: int | None,
    spread: bool,
) -> Scan:
    rc, rm, rd, rg = need
    avoid = request.avoid_nodes
    n = len(cand.positions)
    if rng is not None and n:
        ring = cand.ring()
        start = int(rng.random() * n) % n
    else:
        ring, start = cand.positions, 0
    if enough is None:
        enough = n + 1
    # Under high availability only nodes in the least used failure domains count towards
    # `enough`: the walk goes on past feasible nodes beside existing replicas.
    zones = request.spread_over.zones if spread else {}
    floor = 0
    if zones and len(cand.domains()) <= len(zones):
        floor = min(zones.get(d, 0) for d in cand.domains())
    domain = fleet.domain
    rows, ids = fleet.rows, fleet.ids
    scan = Scan()
    feasible, costs = scan.feasible, scan.costs
    found = 0
    j = start
    for j in range(start, start + n):
        i = ring[j]
        r = rows[i]  # see `fleet.Row` for the layout
        if (
            r[0] >= rc
            and r[1] >= rm
            and r[2] >= rd
            and r[3] >= rg
            and not (avoid and ids[i] in avoid)
        ):
            cost = rc * r[4]
            other = rm * r[5]
            if other > cost:
                cost = other
            if rg:
                other = rg * r[6]
                if other > cost:
                    cost = other
            if cost <= limit:
                feasible.append(i)
                costs.append(cost)
                if not zones or zones.get(domain[i], 0) <= floor:
                    found += 1
                    if found >= enough:
                        j += 1
                        break
                continue
        reason = _why_not(fleet, i, need, avoid)
        scan.rejected[reason] = scan.rejected.get(reason, 0) + 1
    else:
        j = start + n
    scan.checked = j - start
    return scan
