"""The node's table of sandboxes (`SandboxHost`): fenced by incarnation, reported to Weaver as
workloads alike to executions."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.runtimes import make_runtime
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import (
    SandboxControl,
    SandboxSpec,
    SandboxState,
    WorkloadRef,
    decode_from_shuttle,
)
from treadle.shuttle.live.host import SandboxHost


def _spec(incarnation: int) -> SandboxSpec:
    return SandboxSpec(
        id="sbx_f",
        incarnation=incarnation,
        tenant_id="tn_1",
        resources=Resources(cpu_millicores=500, memory_mib=128),
        isolation=Tier.PROCESS,
    )


async def test_a_start_of_an_older_incarnation_never_replaces_the_newer(tmp_path: Path) -> None:
    runtime = make_runtime((Tier.PROCESS, {}), tmp_path)
    host = SandboxHost({Tier.PROCESS: runtime}, tmp_path / "work")
    states: asyncio.Queue[SandboxState] = asyncio.Queue()

    def send(frame: str) -> None:
        message = decode_from_shuttle(frame)
        if isinstance(message, SandboxState):
            states.put_nowait(message)

    host.attach(send)
    try:
        host.start(_spec(2))
        running = await asyncio.wait_for(states.get(), 30)
        assert (running.incarnation, running.state) == (2, "running")

        host.start(_spec(1))  # late: Weaver has moved on to incarnation 2

        stale = await asyncio.wait_for(states.get(), 30)
        assert (stale.incarnation, stale.state) == (1, "stopped")
        assert host.held() == [
            WorkloadRef(kind="sandbox", id="sbx_f", generation=2, state="running")
        ]

        host.start(_spec(3))  # a newer one does replace it
        seen = {}
        while set(seen) != {2, 3}:
            state = await asyncio.wait_for(states.get(), 30)
            seen[state.incarnation] = state.state
        assert seen == {2: "stopped", 3: "running"}
        assert [ref.generation for ref in host.held()] == [3]

        # A control for an incarnation no longer held touches nothing that is.
        host.control(SandboxControl(id="sbx_f", incarnation=2, action="stop"))
        gone = await asyncio.wait_for(states.get(), 30)
        assert (gone.incarnation, gone.state) == (2, "stopped")
        assert [ref.generation for ref in host.held()] == [3]
    finally:
        await host.stop_all()
