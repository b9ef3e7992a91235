"""`place`: filter, score, choose (DESIGN §5).

Two regimes, chosen by the caller:

* Without `sample`, every node is checked and every feasible node scored: criteria are
  normalized over the whole feasible set, `rejected` counts every node, and the runner-ups
  are the true next best. Cost grows with the fleet.
* With `sample` (a `random.Random`, or an int seed), the work per placement is bounded:
  - `lowest_cost` stays exact: the cheapest feasible node always wins. Nodes are scanned by
    price per unit of the resource the request takes the largest share of; `amount * unit
    price` bounds from below the cost of every node not yet scanned, so the scan stops at the
    first bound above the best cost found;
  - `best_performance` stays exact the same way, scanning from the fastest node;
  - both stop once `sample_size` nodes tie on that cost or speed (in a fleet that costs
    nothing, every node ties);
  - `balanced`, `high_availability` and `custom` weigh several criteria, which no single
    sort order answers, so they sample, Nomad-style: a walk from a random point of a
    hash-mixed order stops after `max(2, ⌈log₂ N⌉)` feasible nodes (or `sample_size`), and
    those are scored. `high_availability` keeps walking until it has that many in the least
    used failure domains, so a replica never lands beside another while a feasible node
    elsewhere was merely not drawn.
  Criteria are then normalized over the nodes compared (`candidates`), and `rejected` counts
  only the nodes checked (`unchecked` says how many were not).

In both regimes `lowest_cost` and `best_performance` are lexicographic: the cheapest (the
fastest) feasible node wins, and the preset's other weights only order nodes that tie on it.
A weighted sum would let a node a cent dearer but emptier win, and "lowest cost" would then
be a tendency, not a promise.

When no node is feasible, every node has been checked in either regime, so `Unschedulable`
counts are complete; offers are consulted only then.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping

from treadle.scheduler.fleet import Candidates, Fleet
from treadle.scheduler.nodes import NodeView
from treadle.scheduler.offers import Offer, choose_offer
from treadle.scheduler.policy import CRITERIA, PolicyError, Strategy, validate_policy
from treadle.scheduler.request import Request
from treadle.scheduler.results import Alternative, Placement, Provision, Unschedulable
from treadle.scheduler.scan import (
    Scan,
    SupportsRandom,
    cheapest,
    default_sample_size,
    fastest,
    walk,
)
from treadle.scheduler.score import (
    cost_criterion,
    free_after,
    normalized,
    weights_view,
)

__all__ = ["SupportsRandom", "default_sample_size", "place"]

_RUNNER_UPS = 3
# Enum members looked up once: `Strategy.X` and `.value` cost an attribute descriptor call
# each time, which shows at tens of thousands of placements a second.
_LOWEST = Strategy.LOWEST_COST
_FASTEST = Strategy.BEST_PERFORMANCE
_HA = Strategy.HIGH_AVAILABILITY
_NAMES = {s: s.value for s in Strategy}


def _rng(sample: SupportsRandom | int | None) -> SupportsRandom | None:
    if sample is None or hasattr(sample, "random"):
        return sample
    if isinstance(sample, bool) or not isinstance(sample, int):
        raise TypeError("sample must be a random.Random-like object, an int seed or None")
    return random.Random(sample)


def place(
    request: Request,
    nodes: Fleet | Iterable[NodeView],
    offers: Iterable[Offer] = (),
    *,
    strategy: Strategy | str | None = None,
    sample: SupportsRandom | int | None = None,
    sample_size: int | None = None,
) -> Placement | Provision | Unschedulable:
    """Where to run `request`: a node, an offer to start, or why neither.

    `nodes` is a `Fleet` built once for many placements, or any iterable of node views (an
    index is then built for this call alone). `offers` are consulted only when no node fits.
    `strategy` overrides the request's. `sample` bounds the work per placement (see the
    module docstring); `sample_size` overrides how many nodes it compares. The same inputs,
    including the seed or the generator's state, give the same answer, whatever the order
    of `nodes`.
    """
    fleet = nodes if isinstance(nodes, Fleet) else Fleet(nodes)
    if strategy is None:
        chosen, weights, normal = request._strategy, request._weights, request._normalized
    else:
        chosen, weights = validate_policy(strategy, request.weights)
        normal = normalized(weights)
    rng = _rng(sample)
    if sample_size is not None and (isinstance(sample_size, bool) or sample_size < 1):
        raise PolicyError("sample_size", "must be ≥ 1")
    want = request.resources
    need = (want.cpu_millicores, want.memory_mib, want.disk_mib, want.gpu_count)
    limit = request.max_price_per_hour
    limit = math.inf if limit is None else limit
    cand = fleet.candidates(request)
    n = len(cand.positions)
    size = sample_size if sample_size is not None else default_sample_size(n)

    if not n:
        scan = Scan()
    elif rng is None:
        scan = walk(fleet, cand, request, need, limit, None, None, False)
    elif chosen is _LOWEST:
        scan = cheapest(fleet, cand, need, request.avoid_nodes, limit, size)
    elif chosen is _FASTEST:
        scan = fastest(fleet, cand, need, request.avoid_nodes, limit, size)
    else:
        enough = size if n > size else None
        scan = walk(fleet, cand, request, need, limit, rng, enough, chosen is _HA)

    if scan.feasible:
        return _choose(fleet, cand, request, chosen, weights, normal, need, scan)

    rejected = cand.rejected_counts.copy()
    for reason, count in scan.rejected.items():
        rejected[reason] = rejected.get(reason, 0) + count
    catalog = list(offers)
    if not catalog:
        return Unschedulable(rejected)
    choice, offer_rejected = choose_offer(request, chosen, weights, catalog)
    if choice is None:
        return Unschedulable(rejected, offer_rejected)
    breakdown = dict(zip(CRITERIA, choice.values, strict=True))
    if choice.penalty is not None:
        breakdown["spread_penalty"] = choice.penalty
    if chosen is _LOWEST:
        why = "no node fits; the cheapest feasible offer"
    elif chosen is _FASTEST:
        why = "no node fits; the fastest feasible offer"
    else:
        why = f"no node fits; the best feasible offer by {_NAMES[chosen]}"
    return Provision(
        offer=choice.offer,
        spot=choice.spot,
        score=choice.score,
        breakdown=breakdown,
        weights=weights_view(weights),
        strategy=_NAMES[chosen],
        cost_per_hour=choice.cost,
        price_per_hour=choice.price,
        reason=why,
        rejected=rejected,
        offer_rejected=offer_rejected,
        candidates=choice.candidates,
        runner_ups=tuple(Alternative(*r) for r in choice.runner_ups),
    )


def _choose(
    fleet: Fleet,
    cand: Candidates,
    request: Request,
    chosen: Strategy,
    weights: tuple[float, ...],
    normal: tuple[float, ...],
    need: tuple[int, int, int, int],
    scan: Scan,
) -> Placement:
    feasible, costs = scan.feasible, scan.costs
    rc, rm, _, rg = need
    w0, w1, w2, w3, w4 = normal
    pack = chosen is _LOWEST
    ha = chosen is _HA
    low, high = min(costs), max(costs)
    span = high - low
    rows, region = fleet.rows, fleet.region
    fastest = max([rows[i][10] for i in feasible])
    near = request.near_region
    spread = request.spread_over
    zones, providers = spread.zones, spread.providers
    replicas = spread.replicas if ha else 0
    domain, provider = fleet.domain, fleet.provider

    # The same sum, in the same order, as `score.combine` (whose skipping of zero weights
    # changes nothing: a zero weight adds exactly 0.0), written as comprehensions because a
    # general loop costs several times more per candidate.
    n = len(feasible)
    keys: list[tuple[float, float, float, int, float, float]]
    if not (rg or replicas or pack or chosen is _FASTEST):
        # The common case (a weighted strategy, no GPUs, no replicas to avoid) in one pass.
        keys = [
            (s, -c, 0.0, -i, c, s)
            for c, i in zip(costs, feasible, strict=True)
            for r in [rows[i]]
            for s in [
                w0 * ((high - c) / span if span > 0 else 1.0)
                + w1 * (r[10] / fastest)
                + w2 * (((r[0] - rc) / r[7] + (r[1] - rm) / r[8]) / 2)
                + w3 * r[11]
                + w4 * (1.0 if near is None or region[i] == near else 0.0)
            ]
        ]
    else:
        if rg:
            frees = [
                ((r[0] - rc) / r[7] + (r[1] - rm) / r[8] + (r[3] - rg) / max(r[9], 1)) / 3
                for i in feasible
                for r in [rows[i]]
            ]
        else:
            frees = [
                ((r[0] - rc) / r[7] + (r[1] - rm) / r[8]) / 2 for i in feasible for r in [rows[i]]
            ]
        if pack:
            frees = [1.0 - f for f in frees]
        scores = [
            w0 * ((high - c) / span if span > 0 else 1.0)
            + w1 * (r[10] / fastest)
            + w2 * f
            + w3 * r[11]
            + w4 * (1.0 if near is None or region[i] == near else 0.0)
            for c, f, i in zip(costs, frees, feasible, strict=True)
            for r in [rows[i]]
        ]
        if replicas:
            scores = [
                s - (2.0 * zones.get(domain[i], 0) + providers.get(provider[i], 0) / (replicas + 1))
                for s, i in zip(scores, feasible, strict=True)
            ]
        # Larger is better; the lower position (= the lower id) settles a full tie. The last
        # two fields only carry the cost and score along.
        if pack:
            keys = [(-c, s, 0.0, -i, c, s) for s, c, i in zip(scores, costs, feasible, strict=True)]
        elif chosen is _FASTEST:
            keys = [
                (rows[i][10], s, -c, -i, c, s)
                for s, c, i in zip(scores, costs, feasible, strict=True)
            ]
        else:
            keys = [(s, -c, 0.0, -i, c, s) for s, c, i in zip(scores, costs, feasible, strict=True)]
    if n <= 64:
        keys.sort(reverse=True)
        top = keys[: _RUNNER_UPS + 1]
    else:
        top = heapq.nlargest(_RUNNER_UPS + 1, keys)
    best = -top[0][3]
    best_cost = top[0][4]

    r = rows[best]
    free = free_after(need, (r[0], r[1], r[3]), (r[7], r[8], r[9]))
    breakdown = {
        "cost": cost_criterion(best_cost, low, high),
        "performance": r[10] / fastest,
        "load": 1.0 - free if pack else free,
        "reliability": r[11],
        "locality": 1.0 if near is None or region[best] == near else 0.0,
    }
    if ha:
        breakdown["spread_penalty"] = (
            2.0 * zones.get(domain[best], 0) + providers.get(provider[best], 0) / (replicas + 1)
            if replicas
            else 0.0
        )
    rejected: Mapping[str, int] = cand.rejected
    if scan.rejected:
        merged = cand.rejected_counts.copy()
        for reason, count in scan.rejected.items():
            merged[reason] = merged.get(reason, 0) + count
        rejected = merged
    ids = fleet.ids
    return Placement(
        node_id=ids[best],
        score=top[0][5],
        breakdown=breakdown,
        rejected=rejected,
        strategy=_NAMES[chosen],
        weights=weights_view(weights),
        cost_per_hour=best_cost,
        provider=provider[best],
        domain=domain[best],
        candidates=n,
        unchecked=len(cand.positions) - scan.checked,
        runner_ups=tuple([Alternative(ids[-k[3]], k[5], k[4]) for k in top[1:]]),
    )
