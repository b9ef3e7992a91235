"""Machines a provider could start, and which one to start when no node fits.

Catalogs are small next to fleets (tens to a few thousand rows), so offers are checked and
scored exhaustively, with the same criteria and weights as nodes, but one: an offer's cost is
its whole hourly price, not the request's share of it, since starting the machine commits
that price until other work fills it. So `lowest_cost` starts the cheapest machine that fits
(SkyPilot's rule) and `max_price_per_hour` caps the machine's price. A request that allows
spot sees each offer with a spot price twice, on-demand and spot, and the result says which.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from treadle.domain.resources import Tier
from treadle.scheduler.filters import (
    OVER_PRICE,
    location_rejection,
    network_rejection,
    runtime_rejection,
)
from treadle.scheduler.nodes import check_economics
from treadle.scheduler.policy import Strategy
from treadle.scheduler.request import Request
from treadle.scheduler.score import (
    combine,
    cost_criterion,
    free_after,
    normalized,
    packs,
    spread_penalty,
)

__all__ = ["Offer", "OfferChoice", "choose_offer", "offer_rejection"]


@dataclass(frozen=True, slots=True)
class Offer:
    """A machine a provider could start (the shape of a SkyPilot catalog row).

    Capacity is the whole machine; `disk_mib` None means the disk is sized at launch, so any
    request fits it. `runtimes` are the tiers a Shuttle there would offer.
    """

    provider: str
    instance_type: str
    region: str
    cpu_millicores: int
    memory_mib: int
    price_per_hour: float
    zone: str | None = None
    country: str | None = None
    disk_mib: int | None = None
    gpu_count: int = 0
    gpu_type: str | None = None
    spot_price_per_hour: float | None = None
    runtimes: frozenset[Tier] = frozenset({Tier.PROCESS})
    labels: Mapping[str, str] = field(default_factory=dict)
    perf_score: float = 1.0
    # Tiers that would give network; None: all of `runtimes` (the machine is ours to set up).
    network_tiers: frozenset[Tier] | None = None

    def __post_init__(self) -> None:
        check_economics(self.price_per_hour, self.spot_price_per_hour, self.perf_score)
        if self.cpu_millicores < 1 or self.memory_mib < 1:
            raise ValueError("an offer needs cpu_millicores ≥ 1 and memory_mib ≥ 1")
        if self.gpu_count < 0 or (self.disk_mib is not None and self.disk_mib < 0):
            raise ValueError("gpu_count and disk_mib must be ≥ 0")

    @property
    def name(self) -> str:
        """Stable and unique per catalog row: what results show and ties break on."""
        return f"{self.provider}/{self.instance_type}/{self.zone or self.region}"


def offer_rejection(request: Request, offer: Offer) -> str | None:
    """Why starting `offer` would not help `request` (price aside), or None."""
    reason = location_rejection(request, offer.region, offer.zone, offer.country)
    if reason is not None:
        return reason
    reason = runtime_rejection(request, offer.runtimes)
    if reason is not None:
        return reason
    if request.network:
        network = offer.runtimes if offer.network_tiers is None else offer.network_tiers
        reason = network_rejection(request, network)
        if reason is not None:
            return reason
    for key, value in request.labels.items():
        if offer.labels.get(key) != value:
            return f"without label {key}={value}"
    want = request.resources
    if want.gpu_count > offer.gpu_count:
        return "with too few gpus"
    if want.gpu_type is not None and offer.gpu_type != want.gpu_type:
        return f"without gpu type {want.gpu_type}"
    if want.cpu_millicores > offer.cpu_millicores:
        return "with too little cpu"
    if want.memory_mib > offer.memory_mib:
        return "with too little memory"
    if offer.disk_mib is not None and want.disk_mib > offer.disk_mib:
        return "with too little disk"
    return None


@dataclass(frozen=True, slots=True)
class OfferChoice:
    """The offer to start and everything needed to explain the choice."""

    offer: Offer
    spot: bool
    score: float
    values: tuple[float, ...]
    penalty: float | None
    cost: float
    price: float
    candidates: int
    runner_ups: tuple[tuple[str, float, float], ...]


def choose_offer(
    request: Request,
    strategy: Strategy,
    weights: tuple[float, ...],
    offers: Iterable[Offer],
) -> tuple[OfferChoice | None, dict[str, int]]:
    """The offer to start, by the request's strategy, and why each other offer was refused.

    `lowest_cost` takes the cheapest feasible offer (SkyPilot's rule); `best_performance`
    the fastest; the other strategies the best by score. Ties go to the lower name.
    """
    want = request.resources
    need = (want.cpu_millicores, want.memory_mib, want.disk_mib, want.gpu_count)
    limit = request.max_price_per_hour
    rejected: Counter[str] = Counter()
    variants: list[tuple[Offer, bool, float]] = []
    for offer in sorted(offers, key=lambda o: o.name):
        reason = offer_rejection(request, offer)
        if reason is not None:
            rejected[reason] += 1
            continue
        prices = [(False, offer.price_per_hour)]
        if request.spot and offer.spot_price_per_hour is not None:
            prices.append((True, offer.spot_price_per_hour))
        # Starting a machine for this request commits its whole price until other work
        # fills it: that, not the request's share, is what an offer costs (and what
        # SkyPilot ranks catalogs by).
        fitting = [
            (offer, spot, price) for spot, price in prices if limit is None or price <= limit
        ]
        if not fitting:
            rejected[OVER_PRICE] += 1
        variants.extend(fitting)
    if not variants:
        return None, dict(rejected)

    wn = normalized(weights)
    pack = packs(strategy)
    low = min(v[2] for v in variants)
    high = max(v[2] for v in variants)
    fastest = max(v[0].perf_score for v in variants)
    spread = request.spread_over
    replicas = spread.replicas
    near = request.near_region
    scored: list[tuple[tuple[object, ...], OfferChoice]] = []
    for offer, spot, cost in variants:
        free = free_after(
            need,
            (offer.cpu_millicores, offer.memory_mib, offer.gpu_count),
            (offer.cpu_millicores, offer.memory_mib, offer.gpu_count),
        )
        values = (
            cost_criterion(cost, low, high),
            offer.perf_score / fastest,
            1.0 - free if pack else free,
            1.0,
            1.0 if near is None or offer.region == near else 0.0,
        )
        score = combine(values, wn)
        penalty: float | None = None
        if strategy is Strategy.HIGH_AVAILABILITY:
            penalty = spread_penalty(
                spread.zones.get(offer.zone or offer.region, 0),
                spread.providers.get(offer.provider, 0),
                replicas,
            )
            score -= penalty
        if strategy is Strategy.LOWEST_COST:
            key: tuple[object, ...] = (cost, -score, offer.name, spot)
        elif strategy is Strategy.BEST_PERFORMANCE:
            key = (-offer.perf_score, -score, cost, offer.name, spot)
        else:
            key = (-score, cost, offer.name, spot)
        choice = OfferChoice(offer, spot, score, values, penalty, cost, cost, len(variants), ())
        scored.append((key, choice))
    scored.sort(key=lambda item: item[0])
    best = scored[0][1]
    runner_ups = tuple(
        (c.offer.name + (" (spot)" if c.spot else ""), c.score, c.cost) for _, c in scored[1:4]
    )
    return (
        OfferChoice(
            best.offer,
            best.spot,
            best.score,
            best.values,
            best.penalty,
            best.cost,
            best.price,
            len(variants),
            runner_ups,
        ),
        dict(rejected),
    )
