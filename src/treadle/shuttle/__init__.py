"""Shuttle, the node agent (DESIGN §3, §4): dials out to Weaver, runs work in isolation
runtimes, streams output, heartbeats. Shares only `treadle.domain` and `treadle.protocol`
with Weaver."""

from treadle.shuttle.agent import Shuttle
from treadle.shuttle.errors import ShuttleError
from treadle.shuttle.settings import ShuttleSettings

__all__ = ["Shuttle", "ShuttleError", "ShuttleSettings"]
