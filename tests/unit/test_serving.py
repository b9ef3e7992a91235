"""How a server process runs: on uvloop (a dependency), with a collector that still
collects. Each case runs in a process of its own, since both settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_PROBE = """
import asyncio, gc, json, weakref
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
    return {
        "loop": type(asyncio.get_running_loop()).__module__,
        "collected": gone() is None,
        "enabled": gc.isenabled(),
        "young": gc.get_threshold()[0],
    }

print(json.dumps(serving.run(main())))
"""


def _probe() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


def test_a_server_runs_on_uvloop_and_still_collects_cycles() -> None:
    seen = _probe()
    assert seen["loop"].startswith("uvloop")
    assert seen["enabled"] is True
    assert seen["collected"] is True
    assert seen["young"] == 10_000
