"""Placement v0: filter nodes on hard constraints, then pick the least loaded.

The filter → score → choose shape is the one the full strategies (cost, performance,
reliability) plug into; every rejection is counted by reason so an execution that fits nowhere
can say why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from treadle.domain.resources import Resources, Tier

__all__ = ["NodeView", "Placement", "Request", "Unschedulable", "place"]


@dataclass(frozen=True, slots=True)
class NodeView:
    """A read-only view of one node at decision time."""

    id: str
    capacity: Resources
    free: Resources
    runtimes: frozenset[Tier]
    ready: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    resources: Resources
    isolation: Tier | None = None
    min_isolation: Tier | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    regions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    score: float
    breakdown: Mapping[str, float]
    rejected: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Unschedulable:
    rejected: Mapping[str, int]

    @property
    def message(self) -> str:
        if not self.rejected:
            return "no node is connected"
        parts = [
            f"{reason} ({count} node{'s' if count != 1 else ''})"
            for reason, count in sorted(self.rejected.items())
        ]
        return "no node can run it: " + "; ".join(parts)


def _rejection(request: Request, node: NodeView) -> str | None:
    """Why `node` cannot take `request`, or None when it can."""
    if not node.ready:
        return "not ready"
    if request.isolation is not None and request.isolation not in node.runtimes:
        return f"without runtime {request.isolation.value}"
    minimum = request.min_isolation
    if minimum is not None and all(t.strength < minimum.strength for t in node.runtimes):
        return f"without a runtime of at least {minimum.value}"
    if request.regions and node.region not in request.regions:
        return "outside the allowed regions"
    for key, value in request.labels.items():
        if node.labels.get(key) != value:
            return f"without label {key}={value}"
    want, free = request.resources, node.free
    if want.cpu_millicores > free.cpu_millicores:
        return "with too little free cpu"
    if want.memory_mib > free.memory_mib:
        return "with too little free memory"
    if want.disk_mib > free.disk_mib:
        return "with too little free disk"
    if want.gpu_count > free.gpu_count:
        return "with too few free gpus"
    if want.gpu_type is not None and free.gpu_type != want.gpu_type:
        return f"without gpu type {want.gpu_type}"
    return None


def _free_share(node: NodeView) -> float:
    cap, free = node.capacity, node.free
    cpu = free.cpu_millicores / cap.cpu_millicores if cap.cpu_millicores else 0.0
    mem = free.memory_mib / cap.memory_mib if cap.memory_mib else 0.0
    return (cpu + mem) / 2


def place(request: Request, nodes: Iterable[NodeView]) -> Placement | Unschedulable:
    rejected: Counter[str] = Counter()
    best: NodeView | None = None
    best_key: tuple[float, str] | None = None
    for node in nodes:
        reason = _rejection(request, node)
        if reason is not None:
            rejected[reason] += 1
            continue
        # Highest free share wins; the smaller id breaks ties, so the choice is deterministic.
        key = (-_free_share(node), node.id)
        if best_key is None or key < best_key:
            best, best_key = node, key
    if best is None or best_key is None:
        return Unschedulable(dict(rejected))
    return Placement(
        node_id=best.id,
        score=-best_key[0],
        breakdown={"load": -best_key[0]},
        rejected=dict(rejected),
    )
