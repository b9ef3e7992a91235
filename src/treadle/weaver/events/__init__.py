"""Event bus: one interface, in-process implementation (NATS JetStream joins later)."""

from treadle.weaver.events.bus import BusEvent, EventBus, InProcessBus, Subscription

__all__ = ["BusEvent", "EventBus", "InProcessBus", "Subscription"]
