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


# Run apart, in a process of its own: a node that spins on its event loop would hang the
# test run itself; here it only makes the process miss its deadline.
_DETACH_WHILE_BLOCKED = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from support.runtimes import make_runtime
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import (
    ExecStart, ProcessCall, SandboxSpec, SandboxState, StreamEnd, decode_from_shuttle,
)
from treadle.shuttle.live.host import SandboxHost

WINDOW = 1024 * 1024  # what Weaver grants a stream at first

def waiting_for_a_grant() -> bool:
    for task in asyncio.all_tasks():
        awaited = task.get_coro()
        while awaited is not None:
            if getattr(awaited, "__qualname__", "").endswith("._room"):
                return True
            awaited = getattr(awaited, "cr_await", None)
    return False

async def main() -> None:
    home = Path(sys.argv[1])
    host = SandboxHost({Tier.PROCESS: make_runtime((Tier.PROCESS, {}), home)}, home / "work")
    frames: asyncio.Queue = asyncio.Queue()
    host.attach(lambda frame: frames.put_nowait(decode_from_shuttle(frame)))
    spec = SandboxSpec(
        id="sbx_flood", incarnation=1, tenant_id="tn_1",
        resources=Resources(cpu_millicores=500, memory_mib=128), isolation=Tier.PROCESS,
    )
    host.start(spec)
    while not isinstance(message := await frames.get(), SandboxState):
        pass
    assert message.state == "running", message
    host.exec_start(ExecStart(stream=7, id="sbx_flood", incarnation=1, argv=["yes"], window=WINDOW))
    # Until the window is too small for the next piece of output, held until Weaver grants
    # room (never, here): what it sent until then waits in `frames`.
    while not waiting_for_a_grant():
        await asyncio.sleep(0.01)
    host.stream_detach(7)  # the client leaves while the node waits to send it more
    # The node still answers: the process is listed, running, its output kept meanwhile.
    host.process_call(ProcessCall(stream=8, id="sbx_flood", incarnation=1, op="list"))
    while not (isinstance(message := await frames.get(), StreamEnd) and message.stream == 8):
        pass
    assert [view["running"] for view in message.result] == [True], message
    await host.stop_all()
    print("answering")

asyncio.run(main())
"""


def test_a_stream_left_while_its_process_floods_it_does_not_stop_the_node(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _DETACH_WHILE_BLOCKED, str(tmp_path), str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "answering", done.stderr[-2000:]
