"""Hard constraints and the reason each one gives.

A node is counted once, under the first check it fails, in this order:

1. location: `regions`, `zones`, `countries` allow-lists, then `avoid_regions`;
2. the node itself: ready, exact runtime, minimum tier, network (when asked for), labels,
   taints, spot;
3. GPU model: enough GPUs installed at all, the requested GPU type;
4. this request on this node now: a node to avoid (an earlier attempt died there), free
   cpu, memory, disk and GPUs, then the cost of the requested share against the max price.

Groups 1-3 do not depend on free capacity, so `Fleet` evaluates them once per kind of
request and reuses the answer; group 4 runs per node examined.
"""

from __future__ import annotations

from treadle.domain.resources import Tier
from treadle.scheduler.nodes import NodeView
from treadle.scheduler.request import Request

__all__ = [
    "AVOIDED_NODE",
    "OVER_PRICE",
    "TOO_FEW_GPUS",
    "TOO_LITTLE_CPU",
    "TOO_LITTLE_DISK",
    "TOO_LITTLE_MEMORY",
    "location_rejection",
    "network_rejection",
    "runtime_rejection",
    "static_rejection",
]

NO_NETWORK = "without network in a usable tier"
OUTSIDE_REGIONS = "outside the allowed regions"
OUTSIDE_ZONES = "outside the allowed zones"
OUTSIDE_COUNTRIES = "outside the allowed countries"
AVOIDED_REGION = "in a region to avoid"
NOT_READY = "not ready"
SPOT_NOT_ALLOWED = "spot not allowed"
AVOIDED_NODE = "where a previous attempt failed"
TOO_LITTLE_CPU = "with too little free cpu"
TOO_LITTLE_MEMORY = "with too little free memory"
TOO_LITTLE_DISK = "with too little free disk"
TOO_FEW_GPUS = "with too few free gpus"
OVER_PRICE = "over the max price"


def location_rejection(
    request: Request, region: str | None, zone: str | None, country: str | None
) -> str | None:
    if request.regions and region not in request.regions:
        return OUTSIDE_REGIONS
    if request.zones and zone not in request.zones:
        return OUTSIDE_ZONES
    if request.countries and (country or "").upper() not in {c.upper() for c in request.countries}:
        return OUTSIDE_COUNTRIES
    if region is not None and region in request.avoid_regions:
        return AVOIDED_REGION
    return None


def runtime_rejection(request: Request, runtimes: frozenset[Tier]) -> str | None:
    if request.isolation is not None and request.isolation not in runtimes:
        return f"without runtime {request.isolation.value}"
    minimum = request.min_isolation
    if minimum is not None and all(t.strength < minimum.strength for t in runtimes):
        return f"without a runtime of at least {minimum.value}"
    return None


def network_rejection(request: Request, network_tiers: frozenset[Tier]) -> str | None:
    """Work that asks for network needs a tier it may run in that gives network there."""
    if request.isolation is not None:
        usable = request.isolation in network_tiers
    elif request.min_isolation is not None:
        floor = request.min_isolation.strength
        usable = any(t.strength >= floor for t in network_tiers)
    else:
        usable = bool(network_tiers)
    return None if usable else NO_NETWORK


def static_rejection(request: Request, node: NodeView) -> str | None:
    """Why `node` can never take `request` whatever its free capacity, or None."""
    if request.regions or request.zones or request.countries or request.avoid_regions:
        reason = location_rejection(request, node.region, node.zone, node.country)
        if reason is not None:
            return reason
    if not node.ready:
        return NOT_READY
    if request.isolation is not None or request.min_isolation is not None:
        reason = runtime_rejection(request, node.runtimes)
        if reason is not None:
            return reason
    if request.network:
        reason = network_rejection(request, node.network_tiers)
        if reason is not None:
            return reason
    for key, value in request.labels.items():
        if node.labels.get(key) != value:
            return f"without label {key}={value}"
    if node.taints:
        for key in sorted(node.taints):
            if key not in request.tolerations:
                return f"with taint {key}={node.taints[key]} not tolerated"
    if node.spot and not request.spot:
        return SPOT_NOT_ALLOWED
    want = request.resources
    if want.gpu_count > node.capacity.gpu_count:
        return TOO_FEW_GPUS
    if want.gpu_type is not None and node.gpu_type != want.gpu_type:
        return f"without gpu type {want.gpu_type}"
    return None
