"""The attempts this node runs, and their output and exit reports until Weaver stores them.

Delivery is at-least-once, ordered, and survives a lost link (DESIGN §2, rule 3). Each
attempt numbers its chunks from 0 and keeps them in two queues: `unsent` (produced, not yet
handed to the current link) and `inflight` (handed over, not yet acknowledged). An Ack
drops everything up to its `seq`; a new link moves `inflight` back in front of `unsent`, so
a replay is just the next flush. Weaver stores by `(attempt, seq)`, so duplicates are free.

`Started` is not replayed: the `workloads` list of the next Hello tells Weaver what this node
holds. Sending is batched per event-loop iteration: producing a chunk marks its attempt dirty and
schedules one flush with `call_soon`, which turns each dirty attempt's new chunks into as few
Output frames as the frame size allows. Nothing waits on a timer, so `echo 13` costs no
added latency, and a burst of output from many programs costs one pass.

What leaves for Weaver is held to the protocol's limits (`treadle.protocol.limits`): output
past the assignment's `max_output_bytes` is cut with a marker and the rest read and dropped,
and a result that breaks the limits is dropped and reported as `result_invalid`, so no
program can make this node send a frame Weaver refuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import ValidationError

from treadle.domain.resources import Tier
from treadle.protocol.limits import OutputBudget
from treadle.protocol.messages import (
    Ack,
    AssignSpec,
    Chunk,
    Exited,
    Output,
    Started,
    UsageRecord,
    WorkloadRef,
    encode,
)
from treadle.shuttle.gauge.meter import ZERO, Meter
from treadle.shuttle.gauge.outbox import UsageOutbox
from treadle.shuttle.gpus import GpuPool, GpuUse, GpuUseReader
from treadle.shuttle.metrics import ShuttleMetrics
from treadle.shuttle.output import OutputDecoder
from treadle.shuttle.runtimes.base import (
    ExitStatus,
    Runtime,
    RuntimeHandle,
    SpawnFailed,
    Stream,
)
from treadle.shuttle.sandbox.cgroups import GroupUsage

__all__ = ["FRAME_MAX_CHARS", "Supervisor"]

log = logging.getLogger(__name__)

# Output frames stay well under the 1 MiB that WebSocket servers accept by default, even when
# every character needs a 6-byte JSON escape.
FRAME_MAX_CHARS = 128 * 1024
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")

Send = Callable[[str], None]


class _Attempt:
    __slots__ = (
        "budget",
        "cancelled",
        "exit_sent",
        "exited",
        "handle",
        "inflight",
        "next_seq",
        "ref",
        "room",
        "spec",
        "task",
        "unacked",
        "unsent",
    )

    def __init__(self, spec: AssignSpec) -> None:
        self.spec = spec
        self.ref = WorkloadRef(kind="execution", id=spec.id, generation=spec.attempt)
        self.handle: RuntimeHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.next_seq = 0
        self.unsent: deque[Chunk] = deque()
        self.inflight: deque[Chunk] = deque()
        self.unacked = 0  # characters in unsent + inflight
        self.room = asyncio.Event()
        self.room.set()
        self.exited: Exited | None = None
        self.exit_sent = False
        self.budget = OutputBudget(spec.max_output_bytes)

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.id, self.spec.attempt


class Supervisor:
    """Starts attempts on their runtime and holds what they produce until it is acknowledged.

    `max_unacked` bounds the unacknowledged output of one attempt (in characters): past it,
    the attempt's output is no longer read, so the program blocks on write until acks free
    room. Nothing is dropped.
    """

    def __init__(
        self,
        runtimes: Mapping[Tier, Runtime],
        work_root: Path,
        *,
        max_unacked: int,
        gpus: GpuPool | None = None,
        metrics: ShuttleMetrics | None = None,
        usage: UsageOutbox | None = None,
        usage_interval_s: float = 5.0,
        gpu_use: GpuUseReader | None = None,
    ) -> None:
        self._metrics = metrics or ShuttleMetrics()
        self._gpu_use = gpu_use
        self._usage = usage
        self._usage_interval_s = usage_interval_s
        self._runtimes = runtimes
        self._gpus = gpus or GpuPool([])
        self._work_root = work_root
        self._max_unacked = max_unacked
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._send: Send | None = None
        self._dirty: dict[tuple[str, int], _Attempt] = {}
        self._flush_scheduled = False
        self._closing = False

    # The link to Weaver

    def attach(self, send: Send) -> None:
        """A new link is up (Welcome received): replay everything not acknowledged, in order,
        before anything produced from now on."""
        self._send = send
        self._dirty.clear()
        for attempt in self._attempts.values():
            attempt.unsent.extendleft(reversed(attempt.inflight))
            attempt.inflight.clear()
            attempt.exit_sent = False
            self._flush_attempt(attempt, send)

    def detach(self) -> None:
        self._send = None

    def held(self) -> list[WorkloadRef]:
        """Attempts still running or with output or an exit report Weaver has not stored."""
        return [attempt.ref for attempt in self._attempts.values()]

    # Weaver's verbs

    def assign(self, spec: AssignSpec) -> None:
        if (spec.id, spec.attempt) in self._attempts or self._closing:
            return
        attempt = _Attempt(spec)
        self._attempts[attempt.key] = attempt
        attempt.task = asyncio.create_task(self._run(attempt), name=f"{spec.id}#{spec.attempt}")

    def cancel(self, execution_id: str, attempt_no: int) -> None:
        attempt = self._attempts.get((execution_id, attempt_no))
        if attempt is None or attempt.exited is not None:
            return
        attempt.cancelled = True
        if attempt.handle is not None:
            attempt.handle.kill()

    def ack(self, ack: Ack) -> None:
        attempt = self._attempts.get((ack.id, ack.attempt))
        if attempt is None:
            return
        if ack.seq is not None:
            # inflight holds lower seqs than unsent; an ack may cover both after a replay.
            for queue in (attempt.inflight, attempt.unsent):
                while queue and queue[0].seq <= ack.seq:
                    attempt.unacked -= len(queue.popleft().data)
            if attempt.unacked <= self._max_unacked:
                attempt.room.set()
        if ack.exited and attempt.exited is not None:
            del self._attempts[attempt.key]
            self._dirty.pop(attempt.key, None)

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Kill every attempt and wait (bounded) for the runtimes to clean up after them."""
        self._closing = True
        tasks = []
        for attempt in self._attempts.values():
            attempt.cancelled = True
            attempt.room.set()  # nobody will ack any more: let the output drain into memory
            if attempt.handle is not None:
                attempt.handle.kill()
            if attempt.task is not None and not attempt.task.done():
                tasks.append(attempt.task)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # Running one attempt

    async def _run(self, attempt: _Attempt) -> None:
        spec = attempt.spec
        # Its use counts from zero (a new cgroup, a new process), wherever it is read from.
        meter = Meter("execution", spec.id, spec.attempt)
        meter.start(ZERO)
        metering: asyncio.Task[None] | None = None
        try:
            started = time.monotonic()
            handle = await self._start(spec)
            self._metrics.spawn.labels(spec.isolation.value).observe(time.monotonic() - started)
            attempt.handle = handle
            if self._usage is not None:
                metering = asyncio.create_task(self._metering(meter, handle))
            if attempt.cancelled:
                handle.kill()
            if self._send is not None:
                self._send(encode(Started(id=spec.id, attempt=spec.attempt)))
            decoder = OutputDecoder()
            async for stream, data in handle.output():
                for text in decoder.feed(stream, data):
                    self._append(attempt, stream, text)
                if attempt.unacked > self._max_unacked and not self._closing:
                    attempt.room.clear()
                    await attempt.room.wait()
            for stream, text in decoder.finish():
                self._append(attempt, stream, text)
            status = await handle.wait()
        except Exception:
            # A bug of this node, not of the program: kill what may run and still report, or
            # the execution would wait for a lease to expire.
            log.exception("supervising %s attempt %d failed", spec.id, spec.attempt)
            if attempt.handle is not None:
                attempt.handle.kill()
            status = ExitStatus(exit_code=None, reason="node_error")
        finally:
            if metering is not None:
                metering.cancel()
        # nvidia-smi's utilization is a mean over its last fraction of a second: read as
        # the attempt ends, it is how busy the devices were at its end.
        try:
            gpus = await self._gpus_used(meter) if self._usage is not None else None
        finally:
            self._gpus.give_back(attempt.key)
        # What it used goes before its exit, so Weaver has priced it when the exit lands.
        self._metered(meter, status, gpus)
        try:
            attempt.exited = Exited.report(
                id=spec.id,
                attempt=spec.attempt,
                exit_code=status.exit_code,
                reason=status.reason,
                result=status.result,
                chunks=attempt.next_seq,
                usage=status.usage,
            )
        except ValidationError:
            # What the runtime observed is outside the protocol: still end the attempt.
            log.exception("the exit of %s attempt %d cannot be reported", spec.id, spec.attempt)
            attempt.exited = Exited(
                id=spec.id,
                attempt=spec.attempt,
                exit_code=None,
                reason="node_error",
                chunks=attempt.next_seq,
            )
        self._mark_dirty(attempt)

    async def _metering(self, meter: Meter, handle: RuntimeHandle) -> None:
        """A usage record of the attempt every `usage_interval_s` while it runs, from its
        cgroup where its tier keeps one (the times alone elsewhere; its last record, at its
        end, holds what its runtime measured in all)."""
        counters = getattr(handle, "counters", None)
        while True:
            await asyncio.sleep(self._usage_interval_s)
            read = await asyncio.to_thread(counters) if callable(counters) else None
            self._record(meter.sample(read, gpus=await self._gpus_used(meter)))

    async def _gpus_used(self, meter: Meter) -> GpuUse | None:
        """How busy the devices an attempt holds are now, where they are real."""
        held = self._gpus.held((meter.id, meter.generation))
        if not held or self._gpu_use is None:
            return None
        return await asyncio.to_thread(self._gpu_use.read, [gpu.uuid for gpu in held])

    def _metered(self, meter: Meter, status: ExitStatus, gpus: GpuUse | None) -> None:
        """The attempt's last usage record, from what its runtime measured in all and its
        counters' last read."""
        if self._usage is None:
            return
        usage = status.usage
        total = status.counters
        if usage.cpu_ms is not None:
            total = dataclasses.replace(total or GroupUsage(), cpu_ns=int(usage.cpu_ms * 1e6))
        peak = usage.max_rss_kib * 1024 if usage.max_rss_kib else None
        try:
            record = meter.sample(total, final=True, peak_bytes=peak, gpus=gpus)
        except ValidationError:
            log.exception(
                "the usage of %s attempt %d cannot be reported", meter.id, meter.generation
            )
            return
        self._record(record)

    def _record(self, record: UsageRecord) -> None:
        if self._usage is not None:
            self._usage.add(record)

    async def _start(self, spec: AssignSpec) -> RuntimeHandle:
        runtime = self._runtimes.get(spec.isolation)
        if runtime is None:
            return SpawnFailed(f"treadle: this node has no {spec.isolation.value} runtime\n")
        if not _SAFE_ID.fullmatch(spec.id):
            return SpawnFailed(f"treadle: execution id {spec.id!r} is not a safe file name\n")
        devices = self._gpus.take((spec.id, spec.attempt), spec.resources.gpu_count)
        if devices is None:
            return SpawnFailed(
                f"treadle: this node has fewer than {spec.resources.gpu_count} free GPUs\n"
            )
        # The node decides which devices an attempt sees, whatever its env says.
        spec = spec.model_copy(update={"env": {**spec.env, **GpuPool.env(devices)}})
        try:
            return await runtime.start(spec, self._work_root / f"{spec.id}-{spec.attempt}")
        except Exception as exc:
            log.exception("runtime %s failed to start %s", spec.isolation.value, spec.id)
            return SpawnFailed(f"treadle: the node could not start the program: {exc}\n")

    def _append(self, attempt: _Attempt, stream: Stream, text: str) -> None:
        kept = attempt.budget.take(text)
        if not kept:  # past the cap: read, so that the program goes on, and dropped
            return
        self._metrics.output.labels(stream).inc(len(kept.encode()))
        attempt.unsent.append(Chunk(stream=stream, seq=attempt.next_seq, data=kept))
        attempt.next_seq += 1
        attempt.unacked += len(kept)
        self._mark_dirty(attempt)

    # Sending

    def _mark_dirty(self, attempt: _Attempt) -> None:
        if self._send is None:
            return  # replayed by attach()
        self._dirty[attempt.key] = attempt
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        send = self._send
        if send is None:
            return
        for attempt in dirty.values():
            self._flush_attempt(attempt, send)

    @staticmethod
    def _flush_attempt(attempt: _Attempt, send: Send) -> None:
        unsent = attempt.unsent
        while unsent:
            batch = [unsent.popleft()]
            size = len(batch[0].data)
            while unsent and size + len(unsent[0].data) <= FRAME_MAX_CHARS:
                size += len(unsent[0].data)
                batch.append(unsent.popleft())
            attempt.inflight.extend(batch)
            send(encode(Output(id=attempt.spec.id, attempt=attempt.spec.attempt, chunks=batch)))
        if attempt.exited is not None and not attempt.exit_sent:
            send(encode(attempt.exited))
            attempt.exit_sent = True
