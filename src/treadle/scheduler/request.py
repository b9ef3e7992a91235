"""What a piece of work asks of the scheduler: resources, hard constraints, a strategy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from treadle.domain.resources import Resources, Tier
from treadle.scheduler.policy import PolicyError, Strategy, validate_policy
from treadle.scheduler.score import normalized

__all__ = ["Request", "Spread"]


class _Placed(Protocol):
    @property
    def provider(self) -> str: ...

    @property
    def domain(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Spread:
    """Replicas of the same work placed so far, counted per failure domain (`zones`, keyed as
    `failure_domain` names them) and per provider; `high_availability` steers the next
    replica away from both. Feed each result back with `add` to place N replicas in turn."""

    zones: Mapping[str, int] = field(default_factory=dict)
    providers: Mapping[str, int] = field(default_factory=dict)

    @property
    def replicas(self) -> int:
        # Either count may be left empty by a caller that only tracks the other.
        return max(sum(self.zones.values()), sum(self.providers.values()))

    def add(self, placed: _Placed) -> Spread:
        zones = dict(self.zones)
        zones[placed.domain] = zones.get(placed.domain, 0) + 1
        providers = dict(self.providers)
        providers[placed.provider] = providers.get(placed.provider, 0) + 1
        return Spread(zones, providers)


def _names(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        # A bare string would be read as its characters: `regions="eu"` is a mistake.
        raise PolicyError(name, "must be a list of names, not one string")
    try:
        items = tuple(value)
    except TypeError:
        raise PolicyError(name, "must be a list of names") from None
    if not all(isinstance(item, str) for item in items):
        raise PolicyError(name, "must be a list of names")
    return items


@dataclass(frozen=True, slots=True)
class Request:
    """One placement question. Every field beyond `resources` defaults to "no constraint",
    except `spot`: like AWS and SkyPilot, work runs on on-demand capacity unless it says it
    may be preempted (`spot=True` then allows spot and on-demand alike).

    Allow-lists (`regions`, `zones`, `countries`) are empty for "anywhere"; countries are ISO
    3166 alpha-2 codes, compared without case. `max_price_per_hour` caps the cost of the share
    of a node this request takes, not the node's price. `avoid_nodes` are nodes where an
    earlier attempt died, `avoid_regions` regions that just reclaimed spot capacity.
    `near_region` feeds the locality criterion (only `custom` weighs it). `network`: the
    work needs outbound network, which only some tiers of some nodes give.
    """

    resources: Resources
    isolation: Tier | None = None
    min_isolation: Tier | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    regions: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    strategy: Strategy | str = Strategy.BALANCED
    weights: Mapping[str, float] | None = None
    tolerations: frozenset[str] = frozenset()
    max_price_per_hour: float | None = None
    spot: bool = False
    avoid_nodes: frozenset[str] = frozenset()
    avoid_regions: frozenset[str] = frozenset()
    spread_over: Spread = field(default_factory=Spread)
    near_region: str | None = None
    network: bool = False
    # Derived once here so that placing the same request against a large fleet does not
    # re-derive them on every call.
    _strategy: Strategy = field(init=False, repr=False, compare=False)
    _weights: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _normalized: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _static_key: tuple[object, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        for name in ("regions", "zones", "countries"):
            put(self, name, _names(getattr(self, name), name))
        for name in ("tolerations", "avoid_nodes", "avoid_regions"):
            put(self, name, frozenset(_names(getattr(self, name), name)))
        limit = self.max_price_per_hour
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or limit < 0
        ):
            raise PolicyError("max_price_per_hour", "must be a finite number ≥ 0")
        strategy, weights = validate_policy(self.strategy, self.weights)
        put(self, "strategy", strategy)
        put(self, "_strategy", strategy)
        put(self, "_weights", weights)
        put(self, "_normalized", normalized(weights))
        want = self.resources
        put(
            self,
            "_static_key",
            (
                frozenset(self.regions),
                frozenset(self.zones),
                frozenset(c.upper() for c in self.countries),
                self.avoid_regions,
                self.isolation,
                self.min_isolation,
                tuple(sorted(self.labels.items())),
                self.tolerations,
                self.spot,
                want.gpu_count,
                want.gpu_type,
                self.network,
            ),
        )

    @property
    def policy(self) -> tuple[Strategy, tuple[float, ...]]:
        """The validated strategy and its weights in `CRITERIA` order."""
        return self._strategy, self._weights
