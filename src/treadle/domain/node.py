"""Nodes: hosts running Shuttle, as Weaver sees them."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["NodeState"]


class NodeState(StrEnum):
    READY = "ready"
    DRAINING = "draining"
    DISCONNECTED = "disconnected"
    DOWN = "down"
