"""What the scheduler knows about a node."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from treadle.domain import pricing
from treadle.domain.resources import Resources, Tier

__all__ = ["NodeView", "check_economics", "failure_domain"]


def check_economics(price: float, spot_price: float | None, perf: float) -> None:
    if not (math.isfinite(price) and price >= 0):
        raise ValueError("price_per_hour must be a finite number ≥ 0")
    if spot_price is not None and not (math.isfinite(spot_price) and spot_price >= 0):
        raise ValueError("spot_price_per_hour must be a finite number ≥ 0")
    if not (math.isfinite(perf) and perf > 0):
        raise ValueError("perf_score must be a finite number > 0")


@dataclass(frozen=True, slots=True)
class NodeView:
    """A read-only view of one node at decision time.

    Prices are for the whole node, per hour, in USD; a spot node is billed at
    `spot_price_per_hour` when known. `perf_score` is relative speed (higher is faster, any
    positive scale, compared only within one decision); `reliability` is an EWMA of attempt
    outcomes in [0, 1]. A taint keeps away every request that does not tolerate its key.
    Work that asks for network runs only in one of `network_tiers`.
    """

    id: str
    capacity: Resources
    free: Resources
    runtimes: frozenset[Tier]
    ready: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None
    provider: str = "local"
    zone: str | None = None
    country: str | None = None
    price_per_hour: float = 0.0
    spot: bool = False
    spot_price_per_hour: float | None = None
    perf_score: float = 1.0
    reliability: float = 1.0
    taints: Mapping[str, str] = field(default_factory=dict)
    # The tiers in which this node gives an execution network when it asks (an operator
    # choice; a subset of `runtimes`).
    network_tiers: frozenset[Tier] = frozenset()

    def __post_init__(self) -> None:
        check_economics(self.price_per_hour, self.spot_price_per_hour, self.perf_score)
        if not (0.0 <= self.reliability <= 1.0):
            raise ValueError("reliability must be within [0, 1]")

    @property
    def effective_price(self) -> float:
        """What an hour of the whole node costs as it is billed now."""
        return pricing.node_price(self.price_per_hour, self.spot, self.spot_price_per_hour)

    @property
    def gpu_type(self) -> str | None:
        return self.capacity.gpu_type or self.free.gpu_type


def failure_domain(zone: str | None, region: str | None, fallback: str) -> str:
    """The unit high availability spreads over: the zone; without one, the region (a region
    with no zones named is one zone); without either, the node itself."""
    return zone or region or fallback
