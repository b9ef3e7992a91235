"""The warm pool: VMs booted ahead of their workloads, waiting for a workload's settings.

What a user depends on: a start that finds a waiting VM of its shape takes it and runs as
a cold-booted one would (its own environment, the node's clock at the hand-over, the same
ids and confinement); the boot is not counted as the workload's; a VM that ran anything is
never handed to anyone else; a VM that ends while it waits is never handed over; the pool
keeps within its memory budget, and leaves nothing behind when closed."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from microvm.test_boot import qemu_running, run
from support.runtimes import make_runtime
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.live.pool import WarmPool
from treadle.shuttle.microvm.image import GuestImage
from treadle.shuttle.microvm.launcher import MicrovmLauncher
from treadle.shuttle.microvm.runtime import MicrovmRuntime
from treadle.shuttle.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.microvm

_IMAGE_AT = Path("/.treadle/guest")


def launcher_for(image: GuestImage, home: Path) -> MicrovmLauncher:
    jail = make_runtime((Tier.NAMESPACE, {}), home)
    assert isinstance(jail, ProcessRuntime)
    return MicrovmLauncher(jail.launcher, image)  # type: ignore[arg-type]


def sandbox_spec(name: str, env: dict[str, str], memory_mib: int = 256) -> SandboxSpec:
    return SandboxSpec(
        id=name,
        incarnation=1,
        tenant_id=f"tn_{name}",
        resources=Resources(cpu_millicores=1000, memory_mib=memory_mib),
        isolation=Tier.MICROVM,
        env=env,
    )


@contextlib.asynccontextmanager
async def pooled(
    launcher: MicrovmLauncher, tmp_path: Path, *, per_shape: int = 1, budget_mib: int = 4096
) -> AsyncIterator[tuple[WarmPool, list[LiveSandbox]]]:
    """A pool for `launcher`, and a list for the sandboxes a test starts: all of them, and
    every waiting VM, are ended after the test, and no VM may be left."""
    pool = WarmPool(launcher, per_shape=per_shape, budget_mib=budget_mib, workdir=tmp_path)
    launcher.pool = pool
    started: list[LiveSandbox] = []
    try:
        yield pool, started
    finally:
        for sandbox in started:
            await sandbox.stop(grace_s=0)
        await pool.close()
    assert not qemu_running(_IMAGE_AT)


async def test_a_start_takes_a_waiting_vm_hands_it_its_settings_and_never_returns_it(
    image: GuestImage, tmp_path: Path
) -> None:
    launcher = launcher_for(image, tmp_path / "node")
    async with pooled(launcher, tmp_path) as (pool, started):
        cold = await LiveSandbox.start(launcher, sandbox_spec("sbx_a", {"WHO": "a"}), tmp_path)
        started.append(cold)
        assert cold.counted_before is None
        assert (pool.stats().hits, pool.stats().misses) == (0, 1)
        await pool.filled()  # the miss made the pool keep that shape warm
        assert (pool.stats().ready, pool.stats().booting) == (1, 0)
        waiting = set(qemu_running(_IMAGE_AT)) - {qemu_pid(cold)}
        assert len(waiting) == 1

        warm = await LiveSandbox.start(launcher, sandbox_spec("sbx_b", {"WHO": "b"}), tmp_path)
        started.append(warm)
        assert (pool.stats().hits, pool.stats().misses) == (1, 1)
        assert qemu_pid(warm) in waiting
        ready = await warm.link.ready()
        assert (ready.pid, ready.uid) == (1, 1000)  # the agent as in a cold VM
        out, code = await run(warm.link, ["/bin/sh", "-c", 'echo "$WHO"; date +%s'])
        assert code == 0
        who, then = out.decode().split()
        assert who == "b"  # its own environment, given at the hand-over
        # The node's clock as the VM was handed over, not as it booted and waited.
        assert abs(int(then) - time.time()) < 3

        # Its boot was before it was the workload's: not counted as its use.
        before = warm.counted_before
        assert before is not None and before.cpu_ns
        now, cold_now = warm.counters(), cold.counters()
        assert now is not None and now.cpu_ns is not None
        assert cold_now is not None and cold_now.cpu_ns is not None
        assert now.cpu_ns < cold_now.cpu_ns

        # Ended, it is gone, and the pool boots another one, never the same again.
        taken = qemu_pid(warm)
        await warm.stop(grace_s=0)
        assert taken not in qemu_running(_IMAGE_AT)
        await pool.filled()
        assert pool.stats().ready == 1
        assert taken not in qemu_running(_IMAGE_AT)


async def test_a_vm_that_ends_while_waiting_is_never_handed_over(
    image: GuestImage, tmp_path: Path
) -> None:
    launcher = launcher_for(image, tmp_path / "node")
    async with pooled(launcher, tmp_path) as (pool, started):
        first = await LiveSandbox.start(launcher, sandbox_spec("sbx_c", {}), tmp_path)
        await first.stop(grace_s=0)
        await pool.filled()
        (waiting,) = qemu_running(_IMAGE_AT)
        os.kill(waiting, signal.SIGKILL)
        # Taken at once, before or after the pool saw it end: the sandbox starts either way.
        sandbox = await LiveSandbox.start(launcher, sandbox_spec("sbx_d", {"N": "4"}), tmp_path)
        started.append(sandbox)
        assert qemu_pid(sandbox) != waiting
        out, code = await run(sandbox.link, ["/bin/sh", "-c", 'echo "$N"'])
        assert (out, code) == (b"4\n", 0)


async def test_the_pool_keeps_within_its_budget_and_to_each_shape_its_own(
    image: GuestImage, tmp_path: Path
) -> None:
    launcher = launcher_for(image, tmp_path / "node")
    small = sandbox_spec("sbx_e", {}, memory_mib=256)
    # Room for one VM of the small shape, not for two, nor for one of the large.
    footprint = launcher.footprint_mib(small.assign_spec())
    budget = footprint + 1
    async with pooled(launcher, tmp_path, per_shape=2, budget_mib=budget) as (pool, started):
        started.append(await LiveSandbox.start(launcher, small, tmp_path))
        await pool.filled()
        assert (pool.stats().ready, pool.stats().held_mib) == (1, footprint)
        large = sandbox_spec("sbx_f", {}, memory_mib=512)
        started.append(await LiveSandbox.start(launcher, large, tmp_path))
        assert (pool.stats().hits, pool.stats().misses) == (0, 2)  # not the small one's VM
        await pool.filled()
        assert (pool.stats().ready, pool.stats().held_mib) == (1, footprint)


async def test_an_execution_runs_in_a_warm_vm_as_in_a_cold_one(
    image: GuestImage, tmp_path: Path
) -> None:
    runtime = MicrovmRuntime(launcher_for(image, tmp_path / "node"))
    async with pooled(runtime.launcher, tmp_path) as (pool, _):
        outcomes = []
        for attempt in (1, 2):
            spec = AssignSpec(
                id=f"ex_{attempt}",
                attempt=1,
                tenant_id="tn_1",
                function="echo",
                version=1,
                argv=["/bin/sh", "-c", 'echo "$SAY"; echo \'{"n": 13}\' >&3'],
                env={"SAY": f"run {attempt}"},
                timeout_s=60,
                resources=Resources(cpu_millicores=1000, memory_mib=256),
                isolation=Tier.MICROVM,
            )
            handle = await runtime.start(spec, tmp_path / f"ex_{attempt}")
            out = b"".join([data async for _stream, data in handle.output()])
            status = await handle.wait()
            outcomes.append((out, status.exit_code, status.result))
            await pool.filled()
        assert outcomes == [
            (b"run 1\n", 0, {"n": 13}),
            (b"run 2\n", 0, {"n": 13}),
        ]
        assert (pool.stats().hits, pool.stats().misses) == (1, 1)


def qemu_pid(sandbox: LiveSandbox) -> int:
    """The QEMU process behind a sandbox: the one in its jail's process tree."""
    found = [pid for pid in qemu_running(_IMAGE_AT) if _descends(pid, sandbox.pid)]
    assert len(found) == 1, found
    return found[0]


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return False
