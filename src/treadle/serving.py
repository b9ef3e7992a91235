"""How treadle's long-running processes (Weaver, Shuttle, `treadle up`, the simulated
fleet) run their event loop: one place, so every entry point gets the same.

Two settings, each measured on Weaver's batch path (`bench/control_plane.py`):
  * uvloop, where installed (it comes with `uvicorn[standard]`): uvicorn's own `loop`
    setting only applies when uvicorn makes the loop, and Weaver makes its own;
  * a cyclic collector that runs less often. With CPython's default thresholds (700, 10,
    10) the collector took a quarter of Weaver's CPU under load: each execution allocates
    a few hundred containers, so a young collection ran every couple of executions and a
    full one, which walks every object the process holds, several times a second. What
    was built before serving (modules, classes, the app) lives as long as the process and
    is frozen out of every collection; young objects are collected every 10,000
    allocations instead of 700.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["YOUNG_THRESHOLD", "run", "settle_heap"]

T = TypeVar("T")

YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Freeze what exists now out of future collections and collect young objects less
    often. Garbage is still collected: the older generations keep CPython's ratios. Called
    before the loop starts and again by a server once it has started (what it built while
    starting lives as long as it does)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion as a server process's whole life (what `asyncio.run` is
    for a script). The SIGINT and SIGTERM handlers are as they were once it returns:
    uvloop, unlike asyncio, leaves its own in place when its loop closes, and they then
    ignore the signal (a Shuttle stuck in its interpreter's shutdown would heed only
    SIGKILL)."""
    settle_heap()
    kept = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(main)
    finally:
        for number, handler in kept.items():
            if handler is not None:
                signal.signal(number, handler)
