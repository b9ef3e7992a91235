"""Criteria, their normalization over the feasible set, and how they combine.

Every criterion is in [0, 1], higher is better:

* cost: `(c_max - c)/(c_max - c_min)` over the candidates, `c` the hourly cost of the share
  of the node the request takes (the largest of its cpu, memory and GPU fractions times the
  node's price; for an offer, the machine's whole price); 1 for all when they cost the same;
* performance: `perf / max perf` over the candidates;
* load: the target's free share after placing the request (mean of the cpu and memory
  fractions, and GPUs when the request asks for some). Spread strategies score it as is;
  `lowest_cost` scores `1 - free` (bin-packing) so that equally cheap work fills the nodes
  already busy and leaves others empty to be released — the way to lower a bill on rented
  machines. It is a fraction already, so it is not rescaled over the candidates;
* reliability: the node's outcome EWMA as given (offers, having no history, get 1);
* locality: 1 on the request's `near_region` (or when it names none), else 0.

The score is `Σ wᵢ·cᵢ / Σ wᵢ`, minus a spread penalty under `high_availability`:
`2 * (replicas already in the target's failure domain) + (replicas already on its provider) /
(replicas + 1)`. The first term is ≥ 2 per replica, more than any difference the weighted part
(at most 1) and the provider term (under 1) can make, so a target in a less used domain always
wins; the provider term only leans towards unused providers.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

from treadle.scheduler.policy import CRITERIA, Strategy

__all__ = [
    "combine",
    "cost_criterion",
    "free_after",
    "normalized",
    "packs",
    "spread_penalty",
    "weights_view",
]


@lru_cache(maxsize=256)
def normalized(weights: tuple[float, ...]) -> tuple[float, ...]:
    total = sum(weights)
    return tuple(w / total for w in weights)


@lru_cache(maxsize=256)
def weights_view(weights: tuple[float, ...]) -> Mapping[str, float]:
    """The weights by criterion name; one shared read-only mapping per distinct tuple."""
    return MappingProxyType(dict(zip(CRITERIA, weights, strict=True)))


def packs(strategy: Strategy) -> bool:
    return strategy is Strategy.LOWEST_COST


def cost_criterion(cost: float, low: float, high: float) -> float:
    return (high - cost) / (high - low) if high > low else 1.0


def free_after(
    need: tuple[int, int, int, int],
    free: tuple[int, int, int],
    capacity: tuple[int, int, int],
) -> float:
    """Free share of a target after placing `need` (cpu, memory, disk, gpus)."""
    cpu = (free[0] - need[0]) / capacity[0]
    mem = (free[1] - need[1]) / capacity[1]
    if need[3]:
        return (cpu + mem + (free[2] - need[3]) / max(capacity[2], 1)) / 3
    return (cpu + mem) / 2


def spread_penalty(domain_uses: int, provider_uses: int, replicas: int) -> float:
    return 2.0 * domain_uses + provider_uses / (replicas + 1)


def combine(values: tuple[float, ...], weights: tuple[float, ...]) -> float:
    """Weighted mean with normalized `weights`; the same summation order as the hot loop
    in `place`, so recomputing a breakdown gives the identical score."""
    score = 0.0
    for w, c in zip(weights, values, strict=True):
        if w:
            score += w * c
    return score
