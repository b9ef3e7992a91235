"""Where Shuttle is stuck, written to its log when its event loop stops turning.

Everything a Shuttle does for Weaver, its heartbeat included, runs on one event loop; a call
that blocks it (a read that never ends, a lock never released) makes the node fall silent with
nothing in its log to say why. A timer thread of the interpreter's own (`faulthandler`) is
re-armed by the loop every second; when the loop misses it for `after_s`, the thread writes
every thread's stack to stderr, without needing the loop or the GIL-holding code to cooperate.
SIGUSR1 writes the same on demand, for a node that is slow rather than stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys

__all__ = ["REPORT_AFTER_S", "watch"]

log = logging.getLogger(__name__)

# Well past any single step the loop is meant to take, and under the time Weaver waits for a
# heartbeat before it calls the node down (3 s by default) plus a reconnect.
REPORT_AFTER_S = 10.0
_TICK_S = 1.0


async def watch(after_s: float = REPORT_AFTER_S) -> None:
    """Until cancelled: report a stall of the running loop of more than `after_s`."""
    if not _usable():
        return
    faulthandler.enable(file=sys.stderr, all_threads=True)
    with contextlib.suppress(ValueError, RuntimeError, OSError):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    try:
        while True:
            # Re-arming cancels the previous timer: it fires only if this loop misses a turn
            # for `after_s`, and once per stall.
            faulthandler.dump_traceback_later(after_s, repeat=False, file=sys.stderr)
            await asyncio.sleep(_TICK_S)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _usable() -> bool:
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        log.debug("no stderr file to report stalls to")
        return False
    return True
