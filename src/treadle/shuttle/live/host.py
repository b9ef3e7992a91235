"""The sandboxes this node holds, driven by Weaver's frames, and their streams.

Weaver starts, pauses, resumes and stops sandboxes (`SandboxStart`, `SandboxControl`), each
named by id and incarnation: a frame for another incarnation than the one held is fenced off
(a stop for an older one is answered `stopped`, so Weaver stops waiting for it). Every change
is reported as a `SandboxState`; what the node holds is also in each Hello, so a report lost
with a link is made good by the next one.

Exec streams are relayed within the window Weaver grants per stream (`StreamWindow`): what
is not granted stays in the sandbox (the guest agent stops reading the process), so a client
that stops reading holds back its own stream and nothing else. Streams belong to a link: when
it drops, they end here (their processes run on), and their clients see the stream end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from treadle.domain.resources import Tier
from treadle.domain.sandbox import ACTIVITY_INTERVAL_S, awake_reasons
from treadle.protocol.messages import (
    STREAM_CHUNK_BYTES,
    ExecStart,
    FileStart,
    PortStart,
    ProcessCall,
    SandboxActivity,
    SandboxControl,
    SandboxSpec,
    SandboxState,
    StreamAck,
    StreamData,
    StreamEnd,
    StreamInput,
    StreamResize,
    StreamSignal,
    StreamStarted,
    StreamWindow,
    UsageRecord,
    WorkloadRef,
    encode,
)
from treadle.shuttle.gauge.meter import ZERO, Meter
from treadle.shuttle.gauge.outbox import UsageOutbox
from treadle.shuttle.live import box, desktop
from treadle.shuttle.live.box import LiveSandbox, Unsupported
from treadle.shuttle.live.execs import Exec, ExecTable
from treadle.shuttle.live.link import GuestError, GuestProcess, LinkBroken
from treadle.shuttle.runtimes.base import Runtime

__all__ = ["SandboxHost"]

log = logging.getLogger(__name__)

# How often a running sandbox's usage is recorded (and sent), in seconds.
USAGE_INTERVAL_S = 5.0

Send = Callable[[str], None]
_ToWeaver = SandboxState | SandboxActivity | StreamStarted | StreamData | StreamAck | StreamEnd
# How long the end of a followed process waits for its client to take the last output, before
# keeping what it did not take for the next client to attach.
_CONFIRM_WAIT_S = 30.0
# stdin held per stream for a process that reads slower than its client writes
_STDIN_QUEUED_MAX = 16 * 1024 * 1024


class _Held:
    __slots__ = (
        "activity",
        "execs",
        "incarnation",
        "meter",
        "sandbox",
        "sidecars",
        "spec",
        "state",
        "task",
    )

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self.incarnation = spec.incarnation
        self.sandbox: LiveSandbox | None = None
        self.state = "starting"
        self.task: asyncio.Task[None] | None = None
        self.execs = ExecTable()
        self.activity: list[str] | None = None  # the reasons last reported to Weaver
        self.sidecars: asyncio.Task[None] | None = None  # a desktop's, drained
        self.meter: Meter | None = None  # its usage, once it runs


class _Relay:
    """One stream: a process's (or a connection's, or a file's) bytes sent within the window
    Weaver grants, and what Weaver sends on to it."""

    def __init__(self, stream: int, window: int, sandbox_id: str, kind: str) -> None:
        self.stream = stream
        self.window = window
        self.sandbox_id = sandbox_id
        self.kind = kind  # exec (following a process), port, file, call
        self.closed = False  # no longer relayed: what waits for its window gives up
        self.granted = asyncio.Event()
        if window > 0:
            self.granted.set()
        self.process: GuestProcess | None = None
        self.task: asyncio.Task[None] | None = None
        # stdin, written in the order it came, by one task
        self.inputs: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None
        self.started = asyncio.Event()  # set once `process` is known, or never will be
        self.queued = 0  # stdin bytes received and not yet written to the process
        self.upload = False  # input is a file's content (`_uploaded`), not a process's stdin
        # Output sent and not yet granted back: Weaver grants what its client took, so this
        # is what may be lost with the link (at most the window), kept to be sent again.
        self.unconfirmed: deque[tuple[str, bytes]] = deque()
        self.confirmed = asyncio.Event()  # set when `unconfirmed` empties, or it closes

    def grant(self, amount: int) -> None:
        self.window += amount
        if self.window > 0:
            self.granted.set()
        while amount > 0 and self.unconfirmed:
            channel, data = self.unconfirmed[0]
            if len(data) > amount:
                self.unconfirmed[0] = (channel, data[amount:])
                return
            self.unconfirmed.popleft()
            amount -= len(data)
        if not self.unconfirmed:
            self.confirmed.set()

    def close(self) -> None:
        self.closed = True
        self.granted.set()
        self.confirmed.set()


class SandboxHost:
    def __init__(
        self,
        runtimes: Mapping[Tier, Runtime],
        work_root: Path,
        *,
        usage: UsageOutbox | None = None,
        usage_interval_s: float = USAGE_INTERVAL_S,
    ) -> None:
        self._runtimes = runtimes
        self._work_root = work_root
        self._usage = usage
        self._usage_interval_s = usage_interval_s
        self._held: dict[str, _Held] = {}
        self._relays: dict[int, _Relay] = {}
        self._send: Send | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the link

    def attach(self, send: Send) -> None:
        self._send = send
        for held in self._held.values():
            held.activity = None  # said again on the new link: a report may have been lost

    def detach(self) -> None:
        """The link is gone: its streams end (their processes run on)."""
        self._send = None
        for relay in list(self._relays.values()):
            relay.close()
            if relay.task is not None:
                relay.task.cancel()
        self._relays.clear()

    def held(self) -> list[WorkloadRef]:
        return [
            WorkloadRef(kind="sandbox", id=h.spec.id, generation=h.incarnation, state=h.state)
            for h in self._held.values()
            if h.state in ("starting", "running", "paused")
        ]

    def _emit(self, message: _ToWeaver) -> None:
        if self._send is not None:
            self._send(encode(message))

    def _report(self, held: _Held, state: str, reason: str | None = None) -> None:
        if state in ("running", "paused"):
            held.state = state
        self._emit(
            SandboxState(
                id=held.spec.id,
                incarnation=held.incarnation,
                state=state,
                reason=reason[:1024] if reason else None,
            )
        )

    # usage (DESIGN §13)

    async def _metering(self, meter: Meter, sandbox: LiveSandbox) -> None:
        """A usage record of the sandbox every `usage_interval_s`, while it runs (its last
        comes when it ends)."""
        while True:
            await asyncio.sleep(self._usage_interval_s)
            counters = await asyncio.to_thread(sandbox.counters)
            self._meter(meter.sample(counters))

    def _meter(self, record: UsageRecord) -> None:
        if self._usage is not None:
            self._usage.add(record)

    # activity, for the idle timeout

    async def _watch(self, held: _Held, sandbox: LiveSandbox) -> None:
        """Look at what the sandbox does every ACTIVITY_INTERVAL_S, and tell Weaver when
        why it is awake changes (a paused sandbox is neither: its clock starts again)."""
        before: tuple[int, float] | None = None  # CPU ticks, and when
        idle_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(ACTIVITY_INTERVAL_S)
            if held.state != "running":
                before, idle_since, held.activity = None, None, None
                continue
            try:
                async with asyncio.timeout(ACTIVITY_INTERVAL_S * 2):
                    seen = await sandbox.link.call("activity")
            except (GuestError, LinkBroken, TimeoutError):
                continue
            processes, ticks, hz = _activity(seen)
            now = loop.time()
            cores = None
            if before is not None and ticks is not None and now > before[1]:
                cores = max(0, ticks - before[0]) / hz / (now - before[1])
            before = None if ticks is None else (ticks, now)
            reasons = awake_reasons(processes, self.streams_of(held.spec.id), cores)
            idle_since = None if reasons else (idle_since if idle_since is not None else now)
            if reasons != held.activity:
                held.activity = reasons
                self._emit(
                    SandboxActivity(
                        id=held.spec.id,
                        incarnation=held.incarnation,
                        idle_for_s=None if idle_since is None else now - idle_since,
                        reasons=reasons,
                    )
                )

    # lifecycle

    def start(self, spec: SandboxSpec) -> None:
        current = self._held.get(spec.id)
        if current is not None:
            if current.incarnation == spec.incarnation:
                if current.state in ("running", "paused"):
                    self._report(current, current.state)  # a replayed start: say again
                return
            if current.incarnation > spec.incarnation:
                # Fenced: a start that Weaver has since moved past never replaces its successor.
                self._emit(
                    SandboxState(
                        id=spec.id,
                        incarnation=spec.incarnation,
                        state="stopped",
                        reason="superseded by a newer incarnation",
                    )
                )
                return
            # A newer incarnation replaces an older one still here (Weaver moved on).
            self._stop(current, "replaced by a newer incarnation")
        held = _Held(spec)
        self._held[spec.id] = held
        held.task = asyncio.create_task(self._run(held))

    async def _run(self, held: _Held) -> None:
        spec = held.spec
        # A tier runs sandboxes where its runtime has a launcher to start their agent with.
        launcher = getattr(self._runtimes.get(spec.isolation), "launcher", None)
        if launcher is None:
            self._end(held, "failed", f"this node does not run {spec.isolation} sandboxes")
            return
        live_spec = box.SandboxSpec(
            id=spec.id,
            incarnation=spec.incarnation,
            tenant_id=spec.tenant_id,
            resources=spec.resources,
            isolation=spec.isolation,
            env=desktop.environment(spec.env) if spec.desktop else dict(spec.env),
            image=spec.image,
            network=spec.network,
            home=spec.home,
            sudo=spec.sudo,
        )
        workdir = self._work_root / f"{spec.id}-{spec.incarnation}"
        try:
            sandbox = await LiveSandbox.start(launcher, live_spec, workdir)
        except (OSError, ValueError) as exc:
            self._end(held, "failed", f"cannot start the sandbox: {exc}")
            return
        held.sandbox = sandbox
        if spec.desktop is not None and self._held.get(spec.id) is held:
            try:
                held.sidecars = await desktop.start(sandbox.link, spec.desktop)
            except desktop.DesktopFailed as exc:
                await sandbox.stop(grace_s=0)
                self._end(held, "failed", str(exc))
                return
        if self._held.get(spec.id) is not held:  # stopped while starting
            await sandbox.stop(grace_s=0)
            return
        self._report(held, "running")
        meter = Meter("sandbox", spec.id, spec.incarnation)
        meter.start(ZERO)  # its cgroup and network are new: all they count is its own
        held.meter = meter
        watcher = asyncio.create_task(self._watch(held, sandbox))
        metering = asyncio.create_task(self._metering(meter, sandbox))
        try:
            status = await sandbox.ended
        finally:
            watcher.cancel()
            metering.cancel()
        self._meter(meter.sample(sandbox.counters(), final=True))
        if self._held.get(spec.id) is held:
            reason = status.reason or f"its agent exited with {status.exit_code}"
            self._end(held, "stopped" if status.reason == "stopped" else "failed", reason)

    def control(self, message: SandboxControl) -> None:
        held = self._held.get(message.id)
        if held is None or held.incarnation != message.incarnation:
            if message.action == "stop":
                # Nothing of that incarnation is here (any more): it is stopped.
                self._emit(
                    SandboxState(id=message.id, incarnation=message.incarnation, state="stopped")
                )
            return
        if message.action == "stop":
            self._stop(held, None)
        else:
            self._background(self._pause_or_resume(held, message.action))

    async def _pause_or_resume(self, held: _Held, action: str) -> None:
        sandbox = held.sandbox
        if sandbox is None:
            return  # still starting: the reconciler asks again once it runs
        try:
            if action == "pause":
                await sandbox.pause()
                if held.meter is not None:
                    held.meter.pause()
            else:
                await sandbox.resume()
                if held.meter is not None:
                    held.meter.resume()
        except (Unsupported, OSError) as exc:
            log.warning("sandbox %s: cannot %s: %s", held.spec.id, action, exc)
            self._report(held, held.state, f"cannot {action}: {exc}")
            return
        if self._held.get(held.spec.id) is held:
            self._report(held, "paused" if action == "pause" else "running")

    def _stop(self, held: _Held, reason: str | None) -> None:
        self._held.pop(held.spec.id, None)
        self._background(self._stopping(held, reason))

    async def _stopping(self, held: _Held, reason: str | None) -> None:
        if held.sandbox is not None:
            await held.sandbox.stop()
        elif held.task is not None:
            # Starting: once started it sees it is no longer held and stops itself.
            with contextlib.suppress(Exception):
                await asyncio.shield(held.task)
        self._emit(
            SandboxState(
                id=held.spec.id, incarnation=held.incarnation, state="stopped", reason=reason
            )
        )

    def _end(self, held: _Held, state: str, reason: str) -> None:
        if self._held.get(held.spec.id) is held:
            del self._held[held.spec.id]
        self._report(held, state, reason)

    async def stop_all(self) -> None:
        """Shuttle is stopping: every sandbox ends with it."""
        held = list(self._held.values())
        self._held.clear()
        for one in held:
            if one.sandbox is not None:
                await one.sandbox.stop(grace_s=1)
            elif one.task is not None:
                one.task.cancel()

    # streams

    def _open_stream(
        self, message: ExecStart | FileStart | ProcessCall | PortStart, kind: str
    ) -> tuple[_Relay, _Held] | None:
        """The relay of a new stream in the running sandbox `message` names; None when
        there is nothing to start (a replayed frame, or a sandbox not running here, which
        the stream's end says)."""
        if message.stream in self._relays:
            return None  # a replayed frame: the stream is running
        held = self._held.get(message.id)
        if held is None or held.incarnation != message.incarnation or held.sandbox is None:
            self._emit(StreamEnd(stream=message.stream, error="the sandbox is not running"))
            return None
        relay = _Relay(message.stream, message.window, message.id, kind)
        self._relays[message.stream] = relay
        return relay, held

    def _done(self, relay: _Relay) -> None:
        relay.close()
        relay.started.set()
        self._relays.pop(relay.stream, None)
        if relay.writer is not None:
            relay.writer.cancel()

    def exec_start(self, message: ExecStart) -> None:
        opened = self._open_stream(message, "exec")
        if opened is not None:
            relay, held = opened
            relay.task = asyncio.create_task(self._exec(relay, held, message))

    async def _exec(self, relay: _Relay, held: _Held, message: ExecStart) -> None:
        assert held.sandbox is not None
        try:
            process = await held.sandbox.link.exec(
                list(message.argv),
                env=dict(message.env),
                cwd=message.cwd,
                tag=message.tag,
                stdin=message.stdin,
                pty=None if message.pty is None else (message.pty.rows, message.pty.cols),
                user=message.user,
            )
        except (GuestError, LinkBroken) as exc:
            self._failed(relay, exc)
            self._done(relay)
            return
        ex = Exec(
            process,
            list(message.argv),
            message.tag,
            pty=message.pty is not None,
            timeout_s=message.timeout_s,
        )
        held.execs.add(ex)
        self._background(self._pump(ex))
        await self._follow(relay, ex)

    async def _pump(self, ex: Exec) -> None:
        """The process's output, to whoever follows it, else kept; then its end."""
        process = ex.process
        try:
            async for channel, data in process.output():
                while data:
                    follower = ex.follower
                    if follower is not None and follower.closed:
                        # Detached while output went to it. Its own task lets go of the
                        # process once it runs, after its cancellation; a loop here that
                        # never waits would never let it run, and the whole Shuttle, its
                        # heartbeat too, would stop with it.
                        ex.follower = follower = None
                    if follower is None:
                        ex.keep(channel, data)
                        break
                    data = await self._send_within(follower, channel, data)
            ex.ended(await process.wait(), None)
        except LinkBroken as exc:
            ex.ended(None, str(exc)[:1024])

    async def _follow(self, relay: _Relay, ex: Exec) -> None:
        """`relay` follows `ex`: what was kept first, then live output, then its end. A
        client that attaches takes the process over from one that follows it."""
        relay.process = ex.process
        relay.started.set()
        previous = ex.follower
        if previous is not None and previous is not relay:
            ex.follower = None
            self._emit(
                StreamEnd(stream=previous.stream, error="another client attached to the process")
            )
            self.stream_detach(previous.stream)
        self._emit(StreamStarted(stream=relay.stream, pid=ex.pid, tag=ex.tag))
        ended = False
        try:
            # What was kept, a piece at a time, each taken only once it is sent.
            while (head := ex.peek(STREAM_CHUNK_BYTES)) is not None:
                channel, piece = head
                if not await self._room(relay, len(piece)):
                    return
                ex.drop(len(piece))
                self._send_piece(relay, channel, piece)
            if ex.running:
                ex.follower = relay
                await ex.over.wait()
            exit = ex.exit
            self._emit(
                StreamEnd(
                    stream=relay.stream,
                    exit_code=None if exit is None else exit.exit_code,
                    signal=None if exit is None else exit.signal,
                    error=ex.error,
                    timed_out=ex.timed_out,
                )
            )
            # Its last output and end are on the way: they are delivered once its client
            # has taken them (Weaver grants them back), or kept for the next one.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONFIRM_WAIT_S):
                    while relay.unconfirmed and not relay.closed:
                        relay.confirmed.clear()
                        await relay.confirmed.wait()
            ended = not relay.unconfirmed
        finally:
            if ex.follower is relay:
                ex.follower = None
            if not ended:
                # Its client or its link went: what it may not have received goes first to
                # whoever attaches next (at least once: a grant lost on the way repeats some).
                ex.put_back_all(relay.unconfirmed)
            self._done(relay)

    def process_call(self, message: ProcessCall) -> None:
        opened = self._open_stream(message, "exec" if message.op == "attach" else "call")
        if opened is None:
            return
        relay, held = opened
        if message.op == "list":
            self._emit(StreamEnd(stream=relay.stream, exit_code=0, result=held.execs.views()))
            self._done(relay)
            return
        ex = held.execs.find(message.pid, message.tag)
        if ex is None:
            which = f"pid {message.pid}" if message.pid is not None else f"tag {message.tag!r}"
            self._emit(
                StreamEnd(
                    stream=relay.stream,
                    error=f"no process with {which} was exec'd in this sandbox",
                    error_code="ESRCH",
                )
            )
            self._done(relay)
        elif message.op == "signal":
            if ex.running and message.signal is not None:
                with contextlib.suppress(LinkBroken):
                    ex.process.signal(message.signal)
            self._emit(StreamEnd(stream=relay.stream, exit_code=0, result=ex.view()))
            self._done(relay)
        else:
            relay.task = asyncio.create_task(self._follow(relay, ex))

    def port_start(self, message: PortStart) -> None:
        opened = self._open_stream(message, "port")
        if opened is not None:
            relay, held = opened
            relay.task = asyncio.create_task(self._connect(relay, held, message.port))

    async def _connect(self, relay: _Relay, held: _Held, port: int) -> None:
        """One connection to the sandbox's `port`, for as long as both sides keep it."""
        assert held.sandbox is not None
        process: GuestProcess | None = None
        try:
            process = await held.sandbox.link.connect(port)
            relay.process = process
            relay.started.set()
            async for channel, data in process.output():
                await self._send_within(relay, channel, data)
            await process.wait()
            self._emit(StreamEnd(stream=relay.stream, exit_code=0))
        except (GuestError, LinkBroken) as exc:
            self._failed(relay, exc)
        finally:
            if process is not None and not process.over:
                # The client went away: unlike a process, a connection ends with it.
                with contextlib.suppress(LinkBroken):
                    process.signal(signal.SIGKILL)
            self._done(relay)

    def file_start(self, message: FileStart) -> None:
        # A client watching a directory is not work the sandbox does (for its idle timeout).
        opened = self._open_stream(message, "watch" if message.op == "watch" else "file")
        if opened is not None:
            relay, held = opened
            relay.upload = message.op == "write"
            relay.task = asyncio.create_task(self._file(relay, held, message))

    async def _file(self, relay: _Relay, held: _Held, message: FileStart) -> None:
        assert held.sandbox is not None
        link, path, user = held.sandbox.link, message.path, message.user
        result: Any = None
        try:
            if message.op == "read":
                _, chunks = await link.read_file(path, user=user)
                async for chunk in chunks:
                    await self._send_within(relay, "stdout", chunk)
            elif message.op == "write":
                uploaded = self._uploaded(relay)
                result = await link.write_file(path, uploaded, mode=message.mode, user=user)
            elif message.op == "watch":
                watch = await link.watch(path, recursive=message.recursive, user=user)
                await self._watch_files(relay, watch)
            elif message.op == "move":
                target = message.target or path
                result = await link.call("move", source=path, target=target, user=user)
            elif message.op == "list":
                result = await link.call("list", path=path, depth=message.depth, user=user)
            else:
                result = await link.call(message.op, path=path, user=user)
            self._emit(StreamEnd(stream=relay.stream, exit_code=0, result=result))
        except (GuestError, LinkBroken) as exc:
            self._failed(relay, exc)
        finally:
            self._done(relay)

    def _failed(self, relay: _Relay, exc: GuestError | LinkBroken) -> None:
        """The stream ends with why: the sandbox's errno where it gave one."""
        if isinstance(exc, GuestError):
            end = StreamEnd(stream=relay.stream, error=exc.message[:1024], error_code=exc.errno)
        else:
            end = StreamEnd(stream=relay.stream, error=str(exc)[:1024])
        self._emit(end)

    async def _watch_files(self, relay: _Relay, watch: GuestProcess) -> None:
        """A directory's changes to the stream, until the directory goes or the client."""
        self._emit(StreamStarted(stream=relay.stream))  # the watch is in place
        try:
            async for _, data in watch.output():
                await self._send_within(relay, "stdout", data)
        finally:
            if not watch.over:
                with contextlib.suppress(LinkBroken):
                    watch.signal(signal.SIGTERM)

    async def _send_within(self, relay: _Relay, channel: str, data: bytes) -> bytes:
        """Send `data` on the relay's stream as its window allows; what is left unsent when
        the relay closes is returned."""
        for start in range(0, len(data), STREAM_CHUNK_BYTES):
            piece = data[start : start + STREAM_CHUNK_BYTES]
            if not await self._room(relay, len(piece)):
                return data[start:]
            self._send_piece(relay, channel, piece)
        return b""

    @staticmethod
    async def _room(relay: _Relay, size: int) -> bool:
        """Wait until the window has room for `size` bytes; False if the relay closed."""
        while relay.window < size and not relay.closed:
            relay.granted.clear()
            await relay.granted.wait()
        return not relay.closed

    def _send_piece(self, relay: _Relay, channel: str, piece: bytes) -> None:
        relay.window -= len(piece)
        if relay.kind == "exec":
            relay.unconfirmed.append((channel, piece))
        self._emit(
            StreamData(stream=relay.stream, channel=channel, data=base64.b64encode(piece).decode())
        )

    def stream_window(self, message: StreamWindow) -> None:
        relay = self._relays.get(message.stream)
        if relay is not None:
            relay.grant(message.bytes)

    def stream_input(self, message: StreamInput) -> None:
        relay = self._relays.get(message.stream)
        if relay is None:
            return
        try:
            data = base64.b64decode(message.data, validate=True) if message.data else b""
        except ValueError:
            log.warning("stream %d: stdin that is not base64, dropped", message.stream)
            return
        relay.queued += len(data)
        if relay.queued > _STDIN_QUEUED_MAX:
            # The client writes faster than the process reads, by more than Shuttle holds.
            self._emit(
                StreamEnd(
                    stream=relay.stream,
                    error=f"stdin sent faster than the process reads it "
                    f"(over {_STDIN_QUEUED_MAX} bytes waiting)",
                )
            )
            self.stream_detach(relay.stream)
            return
        # Input may come before the process has started: it waits in the queue.
        relay.inputs.put_nowait((data, message.eof))
        if relay.writer is None and not relay.upload:
            relay.writer = asyncio.create_task(self._input(relay))

    async def _input(self, relay: _Relay) -> None:
        await relay.started.wait()
        process, inputs = relay.process, relay.inputs
        if process is None:
            return  # it never started
        with contextlib.suppress(GuestError, LinkBroken):
            while True:
                data, eof = await inputs.get()
                if data:
                    await process.write_stdin(data)
                    self._taken(relay, len(data))
                if eof:
                    process.close_stdin()
                    return

    def _taken(self, relay: _Relay, size: int) -> None:
        """`size` bytes of the stream's input are passed on: Weaver may send as much more."""
        relay.queued -= size
        self._emit(StreamAck(stream=relay.stream, bytes=size))

    def stream_signal(self, message: StreamSignal) -> None:
        relay = self._relays.get(message.stream)
        if relay is not None and relay.process is not None:
            with contextlib.suppress(LinkBroken):
                relay.process.signal(message.signal)

    def stream_resize(self, message: StreamResize) -> None:
        relay = self._relays.get(message.stream)
        if relay is not None and relay.process is not None:
            with contextlib.suppress(LinkBroken):
                relay.process.resize(message.rows, message.cols)

    def stream_detach(self, stream: int) -> None:
        relay = self._relays.pop(stream, None)
        if relay is not None:
            relay.close()
            if relay.task is not None:
                relay.task.cancel()

    async def _uploaded(self, relay: _Relay) -> AsyncIterator[bytes]:
        """What Weaver sends on a write's stream, until its end; each piece acknowledged
        once the file has it."""
        while True:
            data, eof = await relay.inputs.get()
            if data:
                yield data
                self._taken(relay, len(data))
            if eof:
                return

    def streams_of(self, sandbox_id: str) -> dict[str, int]:
        """The streams open on a sandbox, by kind."""
        kinds: dict[str, int] = {}
        for relay in self._relays.values():
            if relay.sandbox_id == sandbox_id:
                kinds[relay.kind] = kinds.get(relay.kind, 0) + 1
        return kinds


def _activity(seen: Any) -> tuple[int, int | None, int]:
    """(processes, CPU ticks, ticks per second) from the agent's answer, which is the
    sandbox's to forge: anything malformed counts as no processes and no CPU reading."""
    if not isinstance(seen, dict):
        return 0, None, 100
    values = [seen.get("processes"), seen.get("ticks"), seen.get("hz")]
    numbers = [v for v in values if type(v) is int and v >= 0]
    if len(numbers) != 3 or numbers[2] == 0:
        return 0, None, 100
    processes, ticks, hz = numbers
    return min(processes, 1_000_000), ticks, hz
