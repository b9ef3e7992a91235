"""Nodes: the live sessions of connected Shuttles (in memory) and their stored records.

What a node holds is tracked per attempt from assignment until the node reports the exit
(Nomad's observed state), independently of the execution's state: a cancelled execution
still occupies its node until the node says its process tree is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, select, update

from treadle.domain.errors import NotFound
from treadle.domain.node import NodeState
from treadle.domain.resources import Resources
from treadle.protocol import Hello, WeaverMessage
from treadle.scheduler import NodeView
from treadle.weaver.ids import new_id, new_secret
from treadle.weaver.services.auth import hash_secret
from treadle.weaver.services.fleet import order_drain
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.writer import Tx, Writer
from treadle.weaver.views import iso

__all__ = [
    "NO_OUTPUT",
    "Held",
    "NodeRegistry",
    "NodeService",
    "NodeSession",
    "OutputState",
    "record_node_state",
]

_N = tables.nodes
# Weight of the newest outcome: about the last ten attempts count.
RELIABILITY_ALPHA = 0.1
_ZERO = Resources.model_construct(
    cpu_millicores=0, memory_mib=0, disk_mib=0, gpu_count=0, gpu_type=None
)
AttemptKey = tuple[str, int]


@dataclass(slots=True)
class Held:
    """An attempt placed on a node and not yet reported ended by it (only `settled` and
    `output` change)."""

    resources: Resources
    tenant_id: str
    # What program it runs (tenant, function, version), for speed estimates; None: unknown.
    kind: tuple[str, str, int] | None = None
    # The batch that made it, told when it ends (`transitions`); None: none, or unknown.
    batch: str | None = None
    # Ended on Weaver's side (cancelled) while the node still runs it: its reports no longer
    # find it as they expect, so they are checked against the store, not taken to apply.
    settled: bool = False
    # The output the attempt has stored, as committed (`OutputState`), while this session
    # has seen all of its reports (a fresh attempt it placed); None: unknown, read from the
    # store. Its usage records' seqs stored (`metered`) are known while this is not None.
    output: OutputState | None = None
    # When this session took it on (wall clock): no record of its use starts much earlier.
    since: float = field(default_factory=time.time)
    # The seqs of its usage records stored, as committed (`usage`), while `output` is known.
    metered: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class OutputState:
    """How much output an attempt has stored, whether it was cut at the cap, and the seq of
    its last stored chunk (-1 before the first)."""

    bytes: int = 0
    truncated: bool = False
    top: int = -1


NO_OUTPUT = OutputState()


@dataclass(eq=False)
class NodeSession:
    node_id: str
    hello: Hello
    outbox: asyncio.Queue[WeaverMessage | None] = field(default_factory=asyncio.Queue)
    draining: bool = False
    attempts: dict[AttemptKey, Held] = field(default_factory=dict)
    allocated: Resources = _ZERO
    last_heartbeat: float = field(default_factory=time.time)
    # EWMA of how its attempts ended: 1 for each exit it reported, 0 for each lost with it.
    reliability: float = 1.0
    # Relative speed: the node's own measurement, refined by observed run times (speed.py).
    speed: float = 0.0
    # monotonic time of the last frame of any kind: what the reconciler judges silence by
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def capacity(self) -> Resources:
        return self.hello.capacity

    def send(self, message: WeaverMessage) -> None:
        self.outbox.put_nowait(message)

    def close(self) -> None:
        self.outbox.put_nowait(None)

    def __post_init__(self) -> None:
        if not self.speed:
            self.speed = self.hello.perf_score

    def reserve(
        self,
        key: AttemptKey,
        resources: Resources,
        tenant_id: str,
        kind: tuple[str, str, int] | None = None,
        batch: str | None = None,
        output: OutputState | None = None,
    ) -> bool:
        """Hold `resources` for the attempt; False when it already held them."""
        if key in self.attempts:
            return False
        self.attempts[key] = Held(resources, tenant_id, kind, batch, output=output)
        self.allocated = self.allocated.plus(resources)
        return True

    def release(self, key: AttemptKey) -> bool:
        held = self.attempts.pop(key, None)
        if held is None:
            return False
        self.allocated = self.allocated.minus(held.resources)
        return True

    def view(self) -> NodeView:
        hello = self.hello
        capacity = hello.capacity
        return NodeView(
            id=self.node_id,
            capacity=capacity,
            free=capacity.minus(self.allocated),
            runtimes=frozenset(hello.runtimes),
            ready=not self.draining,
            labels=hello.labels,
            region=hello.region,
            provider=hello.provider,
            zone=hello.zone,
            country=hello.country,
            price_per_hour=hello.price_per_hour,
            spot=hello.spot,
            spot_price_per_hour=hello.spot_price_per_hour,
            perf_score=max(self.speed, 1e-6),
            reliability=min(1.0, max(0.0, self.reliability)),
            taints=hello.taints,
            network_tiers=frozenset(hello.network_tiers),
        )

    def observe(self, outcome: float) -> None:
        """Fold one attempt's ending into `reliability` (1: the node reported it)."""
        self.reliability = ewma(self.reliability, outcome)


class NodeRegistry:
    """Connected sessions by node id; at most one per node (a reconnect replaces the old)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._sessions: dict[str, NodeSession] = {}
        self._on_change = on_change
        # Nodes whose hello is being reconciled: present, though not yet in `_sessions`.
        self.connecting: set[str] = set()

    def present(self, node_id: str) -> bool:
        return node_id in self._sessions or node_id in self.connecting

    def add(self, session: NodeSession) -> None:
        old = self._sessions.get(session.node_id)
        if old is not None and old is not session:
            old.close()
        self._sessions[session.node_id] = session
        self._on_change()

    def remove(self, session: NodeSession) -> bool:
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            self._on_change()
            return True
        return False

    def get(self, node_id: str | None) -> NodeSession | None:
        return self._sessions.get(node_id) if node_id else None

    def send(self, node_id: str | None, message: WeaverMessage) -> bool:
        session = self.get(node_id)
        if session is None:
            return False
        session.send(message)
        return True

    def sessions(self) -> list[NodeSession]:
        return list(self._sessions.values())


async def record_node_state(tx: Tx, node_id: str, state: NodeState, **values: Any) -> None:
    """Store a node's new state (and `values`) with its `node.<state>` event."""
    await tx.conn.execute(update(_N).where(_N.c.id == node_id).values(state=state.value, **values))
    tx.emit(f"node.{state.value}", node_id, None, {})


class NodeService:
    def __init__(
        self, db: Database, writer: Writer, registry: NodeRegistry, down_after_s: float
    ) -> None:
        self._db = db
        self._writer = writer
        self._registry = registry
        self._down_after_s = down_after_s

    async def register(self, hello: Hello, node_id: str | None) -> tuple[str, str | None]:
        """Store what the node said about itself; a new node gets an id and a secret."""
        secret = None if node_id else new_secret("ns")
        fields: dict[str, Any] = {
            "name": hello.name,
            "state": NodeState.READY.value,
            "provider": hello.provider,
            "region": hello.region,
            "zone": hello.zone,
            "labels": hello.labels,
            "capacity": hello.capacity.model_dump(mode="json"),
            "runtimes": [tier.value for tier in hello.runtimes],
            "price_per_hour": hello.price_per_hour,
            "country": hello.country,
            "spot": hello.spot,
            "spot_price_per_hour": hello.spot_price_per_hour,
            "perf_score": hello.perf_score,
            "taints": hello.taints,
            "network_tiers": [tier.value for tier in hello.network_tiers],
        }

        async def write(tx: Tx) -> str:
            if node_id is not None:
                # A drained node stays drained when it reconnects.
                fields["state"] = case(
                    (_N.c.state == NodeState.DRAINING.value, NodeState.DRAINING.value),
                    else_=NodeState.READY.value,
                )
                await tx.conn.execute(
                    update(_N).where(_N.c.id == node_id).values(last_heartbeat=tx.now, **fields)
                )
                tx.emit("node.ready", node_id, None, {"name": hello.name})
                return node_id
            new = new_id("nd")
            assert secret is not None
            await tx.conn.execute(
                _N.insert().values(
                    id=new,
                    secret_hash=hash_secret(secret),
                    created_at=tx.now,
                    last_heartbeat=tx.now,
                    **fields,
                )
            )
            tx.emit("node.joined", new, None, {"name": hello.name})
            return new

        return await self._writer.run(write), secret

    async def names(self, node_ids: list[str]) -> dict[str, str]:
        """Node names by id, for the ones that exist."""
        if not node_ids:
            return {}
        async with self._db.read() as conn:
            rows = await conn.execute(select(_N.c.id, _N.c.name).where(_N.c.id.in_(node_ids)))
            return {row.id: row.name for row in rows}

    async def standing(self, node_id: str) -> tuple[bool, float]:
        """What a joining node's session starts from: whether it is drained, and its
        reliability so far."""
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(_N.c.state, _N.c.reliability).where(_N.c.id == node_id))
            ).first()
        if row is None:
            return False, 1.0
        return row.state == NodeState.DRAINING.value, _reliability(row)

    async def set_state(self, node_id: str, state: NodeState) -> None:
        async def write(tx: Tx) -> None:
            await record_node_state(tx, node_id, state, last_heartbeat=tx.now)

        await self._writer.run(write)

    async def list_nodes(self) -> list[dict[str, Any]]:
        async with self._db.read() as conn:
            rows = list(await conn.execute(select(_N).order_by(_N.c.created_at)))
        return [self._view(row) for row in rows]

    async def get(self, node_id: str) -> dict[str, Any]:
        async with self._db.read() as conn:
            row = (await conn.execute(select(_N).where(_N.c.id == node_id))).first()
        if row is None:
            raise NotFound(f"node {node_id!r} not found", details={"id": node_id})
        return self._view(row)

    async def drain(self, node_id: str) -> dict[str, Any]:
        await self.get(node_id)

        async def write(tx: Tx) -> None:
            await record_node_state(tx, node_id, NodeState.DRAINING)
            order_drain(tx, node_id)  # to the replica holding its link, this one or another

        await self._writer.run(write)
        session = self._registry.get(node_id)
        if session is not None:
            session.draining = True
        return await self.get(node_id)

    def _linked_elsewhere(self, row: Any) -> bool:
        """Whether another replica heard from the node lately (it records that twice a
        node-down period)."""
        if row.state not in (NodeState.READY.value, NodeState.DRAINING.value):
            return False
        heard: float | None = row.last_heartbeat
        return heard is not None and time.time() - heard <= self._down_after_s

    def _view(self, row: Any) -> dict[str, Any]:
        session = self._registry.get(row.id)
        allocated = session.allocated if session else _ZERO
        return {
            "id": row.id,
            "name": row.name,
            "state": row.state,
            "provider": row.provider,
            "region": row.region,
            "zone": row.zone,
            "labels": row.labels,
            "capacity": row.capacity,
            "allocated": allocated.model_dump(mode="json"),
            "runtimes": row.runtimes,
            "price_per_hour": row.price_per_hour,
            "country": row.country,
            "spot": bool(row.spot),
            "spot_price_per_hour": row.spot_price_per_hour,
            "perf_score": row.perf_score,
            "observed_speed": round(session.speed, 3) if session else None,
            "reliability": session.reliability if session else _reliability(row),
            "taints": row.taints or {},
            "network_tiers": row.network_tiers or [],
            "last_heartbeat": iso(session.last_heartbeat if session else row.last_heartbeat),
            "connected": session is not None or self._linked_elsewhere(row),
            "running": len(session.attempts) if session else 0,
            "created_at": iso(row.created_at),
        }


def ewma(value: float, outcome: float) -> float:
    """The next reliability: close enough to an outcome, it is that outcome (the series only
    approaches it, and a node back at 1 needs no more writes)."""
    value += RELIABILITY_ALPHA * (outcome - value)
    return outcome if abs(outcome - value) < 1e-6 else value


def _reliability(row: Any) -> float:
    value = row.reliability
    return 1.0 if value is None else float(value)
