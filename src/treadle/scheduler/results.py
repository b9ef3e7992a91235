"""The three answers `place` gives, each carrying what is needed to explain it.

`breakdown` maps every criterion of `CRITERIA` to its normalized value in [0, 1] for the
chosen target (plus `spread_penalty` under `high_availability`); `weights` are the weights
that were applied, so `score = Σ wᵢ·cᵢ / Σ wᵢ - spread_penalty` can be recomputed by a reader.
`rejected` counts, per human reason, the nodes turned away; each node is counted once, under
the first check it failed (see `treadle.scheduler.filters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from treadle.scheduler.offers import Offer

__all__ = ["Alternative", "Placement", "Provision", "Unschedulable"]


class Alternative(NamedTuple):
    """A runner-up: a target that was feasible and ranked below the chosen one. (A named
    tuple rather than a dataclass: a placement builds several, and tuples build fastest.)"""

    target: str
    score: float
    cost_per_hour: float

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "score": self.score, "cost_per_hour": self.cost_per_hour}


@dataclass(frozen=True, slots=True)
class Placement:
    """Run it on `node_id`.

    `candidates` feasible nodes were compared. With sampling or the cheapest/fastest-first
    scans not every node is checked: `unchecked` says how many were never looked at, and
    `rejected` counts only the nodes that were.
    """

    node_id: str
    score: float
    breakdown: Mapping[str, float]
    rejected: Mapping[str, int]
    strategy: str = "balanced"
    weights: Mapping[str, float] = field(default_factory=dict)
    cost_per_hour: float = 0.0
    provider: str = "local"
    domain: str = ""
    candidates: int = 1
    unchecked: int = 0
    runner_ups: tuple[Alternative, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "placement",
            "node_id": self.node_id,
            "score": self.score,
            "strategy": self.strategy,
            "weights": dict(self.weights),
            "breakdown": dict(self.breakdown),
            "cost_per_hour": self.cost_per_hour,
            "provider": self.provider,
            "domain": self.domain,
            "candidates": self.candidates,
            "unchecked": self.unchecked,
            "rejected": dict(self.rejected),
            "runner_ups": [a.to_dict() for a in self.runner_ups],
        }


@dataclass(frozen=True, slots=True)
class Provision:
    """No connected node can run it; starting `offer` would. The provisioner acts on this."""

    offer: Offer
    spot: bool
    score: float
    breakdown: Mapping[str, float]
    weights: Mapping[str, float]
    strategy: str
    cost_per_hour: float
    price_per_hour: float
    reason: str
    rejected: Mapping[str, int]
    offer_rejected: Mapping[str, int]
    candidates: int = 1
    runner_ups: tuple[Alternative, ...] = ()

    @property
    def provider(self) -> str:
        return self.offer.provider

    @property
    def message(self) -> str:
        """Why the work still waits, for a caller that does not act on offers itself."""
        kind = " (spot)" if self.spot else ""
        return (
            f"{self.reason}: {self.offer.name}{kind} at {self.price_per_hour:g} USD/h would run it"
        )

    @property
    def domain(self) -> str:
        return self.offer.zone or self.offer.region

    def to_dict(self) -> dict[str, Any]:
        offer = self.offer
        return {
            "kind": "provision",
            "offer": {
                "name": offer.name,
                "provider": offer.provider,
                "instance_type": offer.instance_type,
                "region": offer.region,
                "zone": offer.zone,
                "country": offer.country,
                "cpu_millicores": offer.cpu_millicores,
                "memory_mib": offer.memory_mib,
                "disk_mib": offer.disk_mib,
                "gpu_count": offer.gpu_count,
                "gpu_type": offer.gpu_type,
                "price_per_hour": offer.price_per_hour,
                "spot_price_per_hour": offer.spot_price_per_hour,
                "runtimes": sorted(t.value for t in offer.runtimes),
                "labels": dict(offer.labels),
                "perf_score": offer.perf_score,
            },
            "spot": self.spot,
            "score": self.score,
            "strategy": self.strategy,
            "weights": dict(self.weights),
            "breakdown": dict(self.breakdown),
            "cost_per_hour": self.cost_per_hour,
            "price_per_hour": self.price_per_hour,
            "reason": self.reason,
            "message": self.message,
            "candidates": self.candidates,
            "rejected": dict(self.rejected),
            "offer_rejected": dict(self.offer_rejected),
            "runner_ups": [a.to_dict() for a in self.runner_ups],
        }


def _counted(rejected: Mapping[str, int], noun: str) -> str:
    return "; ".join(
        f"{reason} ({count} {noun}{'s' if count != 1 else ''})"
        for reason, count in sorted(rejected.items())
    )


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """Nothing can run it. Unlike a placement's, these counts cover every node and offer."""

    rejected: Mapping[str, int]
    offer_rejected: Mapping[str, int] = field(default_factory=dict)

    @property
    def message(self) -> str:
        if not self.rejected:
            text = "no node is connected"
        else:
            text = "no node can run it: " + _counted(self.rejected, "node")
        if self.offer_rejected:
            text += "; no offer fits: " + _counted(self.offer_rejected, "offer")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "unschedulable",
            "message": self.message,
            "rejected": dict(self.rejected),
            "offer_rejected": dict(self.offer_rejected),
        }
