"""Running a small program with the stock `e2b` SDK, installed from PyPI by scripts/e2b-sdks
into .e2b/<version>/: it uses that environment's Python, is configured by environment
variables only, and prints what it saw as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.cluster import Cluster

__all__ = ["MODES", "SDK", "SDKS"]

ROOT = Path(__file__).resolve().parents[2]
# The newest SDK, and the last before create and connect moved to /v2.
SDKS = ["2.63", "2.50"]
MODES = ["sync", "async"]
# A bound on one SDK program, so that a hang fails the test instead of the suite.
_PROGRAM_TIMEOUT_S = 180

# Runs the test's body with `S` the SDK's Sandbox or AsyncSandbox and `w(x)` awaiting what
# the async SDK returns (and passing the sync SDK's values through), so that one body serves
# both; `out(**seen)` prints the result, `failure(call)` what a call raised.
_PRELUDE = """
import asyncio, inspect, json, os, sys
import e2b
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState

S = AsyncSandbox if sys.argv[1] == "async" else Sandbox

async def w(value):
    return await value if inspect.isawaitable(value) else value

async def failure(call):
    try:
        result = await w(call())
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc),
                "status": getattr(exc, "status_code", None)}
    return {"type": None, "result": repr(result)}

def out(**seen):
    print(json.dumps(seen, default=str))

async def main():
{body}

asyncio.run(main())
# The async SDK can abort at interpreter shutdown: what it printed stands.
sys.stdout.flush()
os._exit(0)
"""


@dataclass
class SDK:
    """One SDK version and mode, pointed at the test's Weaver."""

    cluster: Cluster
    version: str
    mode: str

    @property
    def python(self) -> Path:
        return ROOT / ".e2b" / self.version / "bin" / "python"

    def run(self, body: str, key: str | None = None) -> dict[str, Any]:
        """Run `body` (the inside of `async def main()`) and return what it `out()`s."""
        program = _PRELUDE.replace("{body}", textwrap.indent(textwrap.dedent(body), "    "))
        env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
        env.update(
            E2B_API_URL=self.cluster.url,
            E2B_SANDBOX_URL=self.cluster.url,
            E2B_API_KEY=key or self.cluster.admin_key,
        )
        done = subprocess.run(
            # -I: the test tree (a package named e2b) must not shadow the SDK.
            [str(self.python), "-I", "-c", program, self.mode],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.cluster.root,
            timeout=_PROGRAM_TIMEOUT_S,
        )
        assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"
        lines = done.stdout.strip().splitlines()
        assert lines, f"the program printed nothing\n{done.stderr}"
        seen: dict[str, Any] = json.loads(lines[-1])
        return seen
