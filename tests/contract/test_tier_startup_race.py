"""Shuttles starting together on one host (a provider starting several, a test cluster)
each sweep up what earlier ones left: none may lose its container tiers to another's
sweep."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

PROBE = """
import asyncio, json, sys, tempfile
from pathlib import Path
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.runtimes import available_runtimes
from treadle.shuttle.settings import ShuttleSettings
settings = ShuttleSettings(weaver_url="http://127.0.0.1:9", home=Path("/nonexistent"))
runtimes = available_runtimes(settings)
print(json.dumps(sorted(runtimes)), flush=True)

async def run_one() -> None:  # leaves this process's container cgroups for the next to sweep
    spec = AssignSpec(id="ex_race", attempt=1, tenant_id="tn", function="f", version=1,
                      argv=["/bin/true"], timeout_s=30, resources=Resources(), isolation=Tier.OCI)
    handle = await runtimes[Tier.OCI].start(spec, Path(tempfile.mkdtemp()) / "w")
    async for _ in handle.output():
        pass
    await handle.wait()

if sys.argv[1:] == ["run"] and Tier.OCI in runtimes:
    asyncio.run(run_one())
"""


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_shuttles_starting_together_all_offer_the_container_tiers() -> None:
    if shutil.which("crun") is None and shutil.which("runc") is None:
        pytest.skip("no OCI runtime installed")
    alone = _start().communicate(timeout=120)
    assert alone[0], alone[1][-2000:]
    expected = json.loads(alone[0])
    if "oci" not in expected:
        pytest.skip(f"the oci tier does not work here: {alone[1][-500:]}")
    # Each exited process left its state behind; the next ones sweep it, all at once.
    for _ in range(3):
        for _ in range(2):
            ran = _start("run").communicate(timeout=120)
            assert ran[0], ran[1][-2000:]
        together = [_start() for _ in range(4)]
        results = [p.communicate(timeout=120) for p in together]
        for out, err in results:
            assert out and json.loads(out) == expected, err[-2000:]
