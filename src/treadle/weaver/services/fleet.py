"""Orders for nodes whose link may be held by another Weaver replica.

A node keeps one link, to one replica. A cancel or a drain decided on any replica, and the
verdict that a node is down, travel on the `fleet` topic of the event bus; whichever replica
holds that node's link carries them out, the others ignore them. With a single Weaver the
bus brings them back to the same process. They are published only after the transaction
that decided them commits, like every event.

`open` announcements tell the other replicas that work is waiting, so that a replica whose
nodes can take it places it now instead of at its next periodic scan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from treadle.protocol import Cancel
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.events.bus import BusEvent, EventBus, Subscription
from treadle.weaver.store.writer import Tx

if TYPE_CHECKING:  # nodes.py publishes orders from here
    from treadle.weaver.services.nodes import NodeRegistry

__all__ = [
    "FLEET_TOPIC",
    "FleetListener",
    "announce_open",
    "order_cancel",
    "order_disconnect",
    "order_drain",
]

log = logging.getLogger(__name__)
FLEET_TOPIC = "fleet"


def order_cancel(tx: Tx, node_id: str, execution_id: str, attempt: int, reason: str) -> None:
    tx.notify(
        FLEET_TOPIC,
        node_id,
        {"kind": "cancel", "id": execution_id, "attempt": attempt, "reason": reason},
    )


def order_drain(tx: Tx, node_id: str) -> None:
    tx.notify(FLEET_TOPIC, node_id, {"kind": "drain"})


def order_disconnect(tx: Tx, node_id: str) -> None:
    """The node was judged down: a replica still holding a link to it drops that link, and
    the node's next hello reconciles what it runs."""
    tx.notify(FLEET_TOPIC, node_id, {"kind": "disconnect"})


def announce_open(tx: Tx) -> None:
    tx.notify_once(FLEET_TOPIC, "open", {"kind": "open"})


class FleetListener:
    def __init__(
        self, bus: EventBus, registry: NodeRegistry, on_remote_open: Callable[[], None]
    ) -> None:
        self._bus = bus
        self._registry = registry
        self._on_remote_open = on_remote_open
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # Unbounded: unlike "look again" notifications, an order dropped would be lost.
        self._subscription = self._bus.subscribe([FLEET_TOPIC], max_queued=0)
        self._task = asyncio.create_task(self._loop(self._subscription), name="treadle-fleet")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    async def _loop(self, subscription: Subscription) -> None:
        while True:
            event = await subscription.get()
            if event is None:
                continue
            try:
                self.handle(event)
            except Exception:
                log.exception("fleet order %s failed", event.data)

    def handle(self, event: BusEvent) -> None:
        data: dict[str, Any] = event.data
        kind = data.get("kind")
        if kind == "open":
            if event.origin:
                self._on_remote_open()
            return
        session = self._registry.get(event.subject_id)
        if session is None:
            return
        if kind == "cancel":
            held = session.attempts.get((data["id"], int(data["attempt"])))
            if held is not None:
                held.settled = True
            session.send(
                Cancel(
                    id=data["id"],
                    attempt=int(data["attempt"]),
                    reason=data.get("reason") or "cancelled",
                )
            )
        elif kind == "drain":
            session.draining = True
        elif kind == "disconnect":
            log.warning("node %s was judged down elsewhere; dropping its link", event.subject_id)
            session.close()
            self._registry.remove(session)
