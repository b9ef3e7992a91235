"""Pure scheduler: no I/O, no clock, no randomness (DESIGN §5)."""

from treadle.scheduler.place import NodeView, Placement, Request, Unschedulable, place

__all__ = ["NodeView", "Placement", "Request", "Unschedulable", "place"]
