"""A node's warm pool of microVMs: VMs booted ahead of their workloads, each waiting (as the
guest's root, before any confinement) for a workload's settings, so that a start takes one
and skips the boot.

A VM is booted for a shape (`MicrovmLauncher.shape`: its agent, resources, network and
home: all that is fixed when QEMU starts); a workload takes a VM of its own shape only,
hands it its environment and the node's clock, and from then on the VM is that workload's
as a cold-booted one would be: its cgroup's counters start at the hand-over, and it is
destroyed when the workload ends. A VM is never returned to the pool, and nothing in a
waiting VM comes from any tenant.

The pool learns its shapes from demand: a start that finds no VM of its shape (a miss)
starts keeping that shape warm, `per_shape` VMs of it, booted one at a time in the
background and within `budget_mib` of memory for all the pool's idle VMs together; a shape
nobody asked for in `idle_shape_s` loses its VMs, and so does the least recently asked for
past `MAX_SHAPES`. A VM that ends while it waits is dropped, and one that waited
`MAX_WAIT_S` is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from treadle.domain.resources import Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.microvm.launcher import MicrovmLauncher
from treadle.shuttle.runtimes.base import ExitStatus
from treadle.shuttle.runtimes.process import ReadOnlyBind

__all__ = ["PoolStats", "WarmPool"]

log = logging.getLogger(__name__)

# After a boot of a shape failed, the pool tries that shape again no sooner than this.
_RETRY_S = 30.0
# How often the pool looks for shapes gone idle, when nothing else wakes it.
_TRIM_EVERY_S = 60.0
# The most shapes the pool keeps track of: past it, the one asked for least recently goes
# (a tenant's many sizes must not grow it without end).
MAX_SHAPES = 64
# How long a VM may wait: what it was booted with (the node's fence of its network, its
# seccomp program) is the node's as it booted, and the node's may change.
MAX_WAIT_S = 600.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    hits: int
    misses: int
    ready: int  # VMs waiting to be taken
    booting: int
    held_mib: int  # the memory of both, as reserved
    shapes: int  # kept warm


@dataclass
class _Shape:
    key: str
    assign: AssignSpec  # a template: the shape's, with nothing of a workload's
    binds: tuple[ReadOnlyBind, ...]
    footprint_mib: int
    wanted: float  # when a start last asked for it (monotonic)
    ready: deque[LiveSandbox] = field(default_factory=deque)
    booting: int = 0
    failed: float | None = None


class WarmPool:
    def __init__(
        self,
        launcher: MicrovmLauncher,
        *,
        per_shape: int,
        budget_mib: int,
        workdir: Path,
        idle_shape_s: float = 600.0,
    ) -> None:
        if per_shape < 0 or budget_mib < 0:
            raise ValueError("a warm pool's count and budget are at least 0")
        self._launcher = launcher
        self._per_shape = per_shape
        self._budget_mib = budget_mib
        self._workdir = workdir  # unused by the jail; the launcher's interface asks for one
        self._idle_shape_s = idle_shape_s
        self._shapes: dict[str, _Shape] = {}
        self._hits = 0
        self._misses = 0
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def stats(self) -> PoolStats:
        shapes = list(self._shapes.values())
        return PoolStats(
            hits=self._hits,
            misses=self._misses,
            ready=sum(len(shape.ready) for shape in shapes),
            booting=sum(shape.booting for shape in shapes),
            held_mib=self._held_mib(),
            shapes=len(shapes),
        )

    def take(self, assign: AssignSpec, binds: Sequence[ReadOnlyBind]) -> LiveSandbox | None:
        """A VM of `assign`'s shape, booted and waiting, now the caller's to hand over
        (`LiveSandbox.hand_over`) and to end; None where there is none (a miss: the shape
        is kept warm from now on)."""
        if self._closed:
            return None
        key = self._launcher.shape(assign, binds)
        shape = self._shapes.get(key)
        if shape is None:
            template = assign.model_copy(
                update={"id": "warm", "attempt": 0, "tenant_id": "", "env": {}}
            )
            footprint = self._launcher.footprint_mib(assign)
            shape = _Shape(key, template, tuple(binds), footprint, 0.0)
            if len(self._shapes) >= MAX_SHAPES:
                oldest = min(self._shapes.values(), key=lambda s: s.wanted)
                self._drop(oldest)
            self._shapes[key] = shape
        shape.wanted = time.monotonic()
        self._kick()
        while shape.ready:
            vm = shape.ready.popleft()
            vm.ended.remove_done_callback(self._on_idle_end)
            if not vm.ended.done():
                self._hits += 1
                return vm
        self._misses += 1
        return None

    async def filled(self) -> None:
        """Once every shape asked for holds all the VMs the count and budget allow (or
        cannot boot one now)."""
        async with self._changed:
            await self._changed.wait_for(self._settled)

    def _settled(self) -> bool:
        return self._wanting() is None and not any(s.booting for s in self._shapes.values())

    async def close(self) -> None:
        """Stop refilling and end every waiting VM."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        shapes, self._shapes = list(self._shapes.values()), {}
        for shape in shapes:
            while shape.ready:
                vm = shape.ready.popleft()
                vm.ended.remove_done_callback(self._on_idle_end)
                await vm.stop(grace_s=0)

    # refilling

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refill(), name="treadle-warm-pool")
        self._wake.set()

    def _held_mib(self) -> int:
        return sum(
            (len(shape.ready) + shape.booting) * shape.footprint_mib
            for shape in self._shapes.values()
        )

    def _wanting(self) -> _Shape | None:
        """The shape to boot a VM of next: the one short of the most, within the budget."""
        now = time.monotonic()
        room = self._budget_mib - self._held_mib()
        short = [
            shape
            for shape in self._shapes.values()
            if len(shape.ready) + shape.booting < self._per_shape
            and shape.footprint_mib <= room
            and (shape.failed is None or now - shape.failed >= _RETRY_S)
        ]
        return min(short, key=lambda s: len(s.ready) + s.booting, default=None)

    async def _refill(self) -> None:
        while not self._closed:
            self._wake.clear()  # before looking: a kick from now on is seen
            self._trim()
            shape = self._wanting()
            if shape is None:
                await self._notify()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_TRIM_EVERY_S):
                        await self._wake.wait()
                continue
            shape.booting += 1
            try:
                vm = await self._boot(shape)
            except (OSError, ValueError) as exc:
                log.warning("warm pool: cannot boot a VM: %s", exc)
                shape.failed = time.monotonic()
                continue
            finally:
                shape.booting -= 1
            if self._closed or self._shapes.get(shape.key) is not shape:
                await vm.stop(grace_s=0)  # its shape went while it booted
                continue
            shape.failed = None
            shape.ready.append(vm)
            vm.ended.add_done_callback(self._on_idle_end)
            await self._notify()

    async def _boot(self, shape: _Shape) -> LiveSandbox:
        name = f"warm-{secrets.token_hex(6)}"
        spec = SandboxSpec(
            id=name,
            incarnation=0,
            tenant_id="",
            resources=shape.assign.resources,
            isolation=Tier.MICROVM,
            env={},
            image=shape.assign.image,
            network=shape.assign.network,
            home=shape.assign.workdir,
        )
        assign = shape.assign.model_copy(update={"id": name})
        return await LiveSandbox.boot(
            self._launcher, spec, assign, shape.binds, self._workdir, waiting=True
        )

    def _trim(self) -> None:
        now = time.monotonic()
        for shape in list(self._shapes.values()):
            if now - shape.wanted >= self._idle_shape_s:
                self._drop(shape)
                continue
            for vm in [vm for vm in shape.ready if now - vm.booted_at >= MAX_WAIT_S]:
                shape.ready.remove(vm)
                vm.ended.remove_done_callback(self._on_idle_end)
                vm.kill("stopped")  # the refill boots a new one

    def _drop(self, shape: _Shape) -> None:
        """Forget a shape: its waiting VMs end (one booting ends once booted)."""
        del self._shapes[shape.key]
        while shape.ready:
            vm = shape.ready.popleft()
            vm.ended.remove_done_callback(self._on_idle_end)
            vm.kill("stopped")

    def _on_idle_end(self, ended: asyncio.Future[ExitStatus]) -> None:
        for shape in self._shapes.values():
            for vm in list(shape.ready):
                if vm.ended is ended:
                    shape.ready.remove(vm)
                    log.warning("warm pool: a waiting VM ended (%s)", vm.spec.id)
        self._kick()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
