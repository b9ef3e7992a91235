"""Cleanup after a workload, kept off the path of its exit report.

Deleting a container (a process of the OCI runtime's own), unmounting a work dir and
removing cgroups take milliseconds that the user would otherwise wait for on every
execution, after everything about how it ended is already known. So a tier reads what it
needs, reports the exit, and hands the rest to `defer`: the job runs on a worker thread and
is tracked until it is done. `drain` waits for what is pending (a Shuttle stopping); a
Shuttle killed in between leaves the job to the sweep of the next one, which every tier
runs at start.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["defer", "drain", "pending"]

log = logging.getLogger(__name__)

# Two workers: a slow delete (runc, runsc) must not hold up the others, and more would only
# compete with the programs for this node's CPUs.
_pool = ThreadPoolExecutor(2, thread_name_prefix="treadle-cleanup")
_pending: set[Future[None]] = set()
_lock = threading.Lock()


def defer(job: Callable[[], None], what: str) -> None:
    """Run `job` soon, off the event loop; `what` names it in the log if it fails."""

    def run() -> None:
        try:
            job()
        except Exception:
            log.exception("cleaning up %s failed; the next start's sweep retries", what)

    future = _pool.submit(run)
    with _lock:
        _pending.add(future)
    future.add_done_callback(_done)


def _done(future: Future[None]) -> None:
    with _lock:
        _pending.discard(future)


def pending() -> int:
    """Cleanup jobs not finished yet."""
    with _lock:
        return len(_pending)


async def drain(timeout_s: float = 30.0) -> bool:
    """Wait until every deferred job is done (at most `timeout_s`); False if some are not."""
    with _lock:
        futures = [asyncio.wrap_future(f) for f in _pending]
    if not futures:
        return True
    _, left = await asyncio.wait(futures, timeout=timeout_s)
    return not left
