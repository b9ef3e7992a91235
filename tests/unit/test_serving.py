"""How a server process runs: on uvloop (a dependency), with a collector that still
collects, and the signal handlers as they were once it returns. The probe runs in a
process of its own: all of these are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_PROBE = """
import asyncio, gc, json, signal, weakref
from treadle import serving

class Node:
    pass

async def main():
    # A cycle made after the heap was settled: only the cyclic collector frees it.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    # As `treadle shuttle` does: SIGTERM handled by the loop while it runs.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
    return {
        "loop": type(asyncio.get_running_loop()).__module__,
        "collected": gone() is None,
        "enabled": gc.isenabled(),
        "young": gc.get_threshold()[0],
    }

seen = serving.run(main())
seen["sigterm_default"] = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
print(json.dumps(seen))
"""


def _probe() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


def test_a_server_runs_on_uvloop_still_collects_cycles_and_leaves_signals_as_they_were() -> None:
    seen = _probe()
    assert seen["loop"].startswith("uvloop")
    assert seen["enabled"] is True
    assert seen["collected"] is True
    assert seen["young"] == 10_000
    # Once it has returned, SIGTERM ends the process again (uvloop leaves its own handler).
    assert seen["sigterm_default"] is True
