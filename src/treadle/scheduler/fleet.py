"""An index over a snapshot of nodes, built once and asked many placement questions.

Placing one request must not cost a pass over every node at 10,000 nodes, so the index keeps:

* per node, one plain tuple of numbers (`Row`: free and total capacity, price per unit of
  each resource, speed, reliability) that the hot loops read without touching the views;
* per *kind* of request (everything in a request that does not depend on free capacity:
  location lists, runtime, labels, tolerations, spot, GPU model), the nodes that pass those
  checks and the counted reasons of the rest, computed on first use;
* per kind, lazily, those nodes sorted by price per unit of cpu, memory and GPU and by speed,
  so that the cheapest or fastest feasible node is found by scanning from the front.

Nodes are ordered by id, so a node's position doubles as the id tie-break, and the order of
the input never changes an answer. Free capacity and reliability change often and are
updated in place (`update`); anything else about a node rebuilds the index.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from treadle.domain import pricing
from treadle.scheduler.filters import static_rejection
from treadle.scheduler.nodes import NodeView, failure_domain
from treadle.scheduler.request import Request

__all__ = ["Candidates", "Fleet", "Row"]

# Distinct kinds of request seen by one index before its memo starts over; real workloads
# have a few dozen.
_MAX_KINDS = 4096


def _static_signature(node: NodeView) -> tuple[object, ...]:
    return (
        node.capacity,
        node.runtimes,
        node.ready,
        tuple(sorted(node.labels.items())),
        node.region,
        node.provider,
        node.zone,
        node.country,
        node.effective_price,
        node.spot,
        node.perf_score,
        tuple(sorted(node.taints.items())),
        node.gpu_type,
        node.network_tiers,
    )


class Candidates:
    """The nodes of a fleet that pass the static checks for one kind of request."""

    __slots__ = (
        "_domains",
        "_fleet",
        "_mean_capacity",
        "_orders",
        "_ring",
        "positions",
        "rejected",
        "rejected_counts",
    )

    def __init__(self, fleet: Fleet, request: Request) -> None:
        rejected: Counter[str] = Counter()
        positions: list[int] = []
        for i, node in enumerate(fleet.nodes):
            reason = static_rejection(request, node)
            if reason is None:
                positions.append(i)
            else:
                rejected[reason] += 1
        self._fleet = fleet
        self.positions = positions  # in id order
        # A read-only view results can share without copying, and the dict to copy from
        # when a placement adds its own counts.
        self.rejected_counts = dict(rejected)
        self.rejected: Mapping[str, int] = MappingProxyType(self.rejected_counts)
        # The rest is computed on first use: a one-off placement (an index built for a
        # single call) needs none of it.
        self._ring: list[int] | None = None
        self._domains: frozenset[str] | None = None
        self._mean_capacity: tuple[float, float, float] | None = None
        self._orders: dict[str, tuple[list[float], list[int]]] = {}

    def ring(self) -> list[int]:
        """The candidates mixed by a hash of their id, twice over, for sampling walks.

        A walk from a random point of a list in id order would see one provider and
        region (ids often start with them); mixed, a short walk sees a cross-section. Twice
        over, so a walk from any point reads a slice without wrapping around.
        """
        if self._ring is None:
            # Stable sort of a list in id order: equal hashes stay in id order.
            mixed = sorted(self.positions, key=self._fleet.mix.__getitem__)
            self._ring = mixed + mixed
        return self._ring

    def domains(self) -> frozenset[str]:
        if self._domains is None:
            domain = self._fleet.domain
            self._domains = frozenset(domain[i] for i in self.positions)
        return self._domains

    def mean_capacity(self) -> tuple[float, float, float]:
        if self._mean_capacity is None:
            rows, positions = self._fleet.rows, self.positions
            n = len(positions) or 1
            self._mean_capacity = (
                sum(rows[i][7] for i in positions) / n,
                sum(rows[i][8] for i in positions) / n,
                sum(rows[i][9] for i in positions) / n,
            )
        return self._mean_capacity

    def by_unit_price(self, dimension: int) -> tuple[list[float], list[int]]:
        """Positions by price per unit of cpu (0), memory (1) or GPU (2), cheapest first,
        with that unit price alongside."""
        key = ("cpu", "mem", "gpu")[dimension]
        order = self._orders.get(key)
        if order is None:
            unit = [row[4 + dimension] for row in self._fleet.rows]
            ranked = sorted(self.ring()[: len(self.positions)], key=unit.__getitem__)
            order = ([unit[i] for i in ranked], ranked)
            self._orders[key] = order
        return order

    def by_speed(self) -> tuple[list[float], list[int]]:
        """Positions fastest first, with their performance score alongside."""
        order = self._orders.get("perf")
        if order is None:
            perf = [row[10] for row in self._fleet.rows]
            ranked = sorted(self.ring()[: len(self.positions)], key=perf.__getitem__, reverse=True)
            order = ([perf[i] for i in ranked], ranked)
            self._orders["perf"] = order
        return order


# One tuple per node holds every number the hot loops read, built node by node so that a
# node's numbers sit close together in memory: at 10,000 nodes, one list per attribute made
# each node examined cost a cache miss per attribute. The layout (hot loops index it with
# literals):
#   0 free cpu   1 free memory   2 free disk   3 free gpus
#   4 price per millicore   5 price per MiB   6 price per gpu
#   7 cpu capacity   8 memory capacity   9 gpu capacity   10 perf score   11 reliability
Row = tuple[int, int, int, int, float, float, float, int, int, int, float, float]


def _row(node: NodeView) -> Row:
    free, capacity = node.free, node.capacity
    # A capacity of zero on cpu or memory is malformed; treating it as one unit keeps the
    # arithmetic finite and makes any request take the whole node.
    cpu = capacity.cpu_millicores if capacity.cpu_millicores > 0 else 1
    mem = capacity.memory_mib if capacity.memory_mib > 0 else 1
    gpu = capacity.gpu_count
    # The cost of a request's share is max over resources of (amount * unit price), the
    # form the cheapest-first scan bounds from below (`treadle.domain.pricing`).
    per_cpu, per_mib, per_gpu = pricing.unit_prices(node.effective_price, cpu, mem, gpu)
    return (
        free.cpu_millicores,
        free.memory_mib,
        free.disk_mib,
        free.gpu_count,
        per_cpu,
        per_mib,
        per_gpu,
        cpu,
        mem,
        gpu,
        node.perf_score,
        node.reliability,
    )


class Fleet:
    """Read-only to the scheduler; see the module docstring for what it keeps and why."""

    __slots__ = (
        "_kinds",
        "_mix",
        "_positions",
        "domain",
        "ids",
        "nodes",
        "provider",
        "region",
        "rows",
    )

    def __init__(self, nodes: Iterable[NodeView] = ()) -> None:
        self._load(list(nodes))

    def _load(self, nodes: list[NodeView]) -> None:
        nodes.sort(key=lambda n: n.id)
        self.nodes: list[NodeView] = nodes
        self.ids = [n.id for n in nodes]
        self._positions = {node_id: i for i, node_id in enumerate(self.ids)}
        self.rows = [_row(n) for n in nodes]
        self.provider = [n.provider for n in nodes]
        self.region = [n.region for n in nodes]
        self.domain = [failure_domain(n.zone, n.region, n.id) for n in nodes]
        self._mix: list[int] | None = None
        self._kinds: dict[tuple[object, ...], Candidates] = {}

    @property
    def mix(self) -> list[int]:
        """A stable hash of each id (not `hash()`, which changes per process)."""
        if self._mix is None:
            self._mix = [zlib.crc32(node_id.encode()) for node_id in self.ids]
        return self._mix

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._positions

    def get(self, node_id: str) -> NodeView | None:
        i = self._positions.get(node_id)
        return None if i is None else self.nodes[i]

    def update(self, node: NodeView) -> None:
        """Take a newer view of a node (or a new node). Only free capacity or reliability
        changed is an O(1) update; any other change rebuilds the index."""
        i = self._positions.get(node.id)
        if i is None or _static_signature(self.nodes[i]) != _static_signature(node):
            nodes = [n for n in self.nodes if n.id != node.id]
            nodes.append(node)
            self._load(nodes)
            return
        self.nodes[i] = node
        self.rows[i] = _row(node)

    def remove(self, node_id: str) -> None:
        if node_id in self._positions:
            self._load([n for n in self.nodes if n.id != node_id])

    def candidates(self, request: Request) -> Candidates:
        key = request._static_key
        found = self._kinds.get(key)
        if found is None:
            if len(self._kinds) >= _MAX_KINDS:
                self._kinds.clear()
            found = self._kinds[key] = Candidates(self, request)
        return found
