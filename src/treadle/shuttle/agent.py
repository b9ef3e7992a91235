"""Shuttle, the node agent: keeps one WebSocket to Weaver and runs what Weaver assigns.

Shuttle always dials out (hosts may sit behind NAT) and never gives up on the link: it
reconnects with jittered exponential backoff, and executions keep running meanwhile. Their
output and exit reports are held by the Supervisor until Weaver acknowledges them, and are
replayed on the next link. Only conditions retrying cannot fix end `run()`: no runtime, no
credential at all, or a Weaver speaking another protocol version.

Authentication: the first registration uses the operator's join token; Weaver answers with a
node credential that is stored in `home/node.json` and used from then on. If Weaver refuses
that credential (the node was deleted, say) and a join token is configured, Shuttle
registers again with the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from treadle.domain.errors import ProtocolError
from treadle.domain.resources import Resources, Tier
from treadle.protocol.limits import MAX_FRAME_BYTES
from treadle.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Assign,
    Cancel,
    ExecStart,
    FileStart,
    Heartbeat,
    Hello,
    PortStart,
    ProcessCall,
    SandboxControl,
    SandboxStart,
    StreamDetach,
    StreamInput,
    StreamResize,
    StreamSignal,
    StreamWindow,
    UsageAck,
    Welcome,
    WorkloadRef,
    decode_from_weaver,
    encode,
)
from treadle.shuttle import reaper, stall
from treadle.shuttle.backoff import Backoff
from treadle.shuttle.benchmark import cpu_score
from treadle.shuttle.capacity import detect_capacity
from treadle.shuttle.credentials import NodeCredential, load_credential, save_credential
from treadle.shuttle.errors import ShuttleError
from treadle.shuttle.gauge.outbox import UsageOutbox
from treadle.shuttle.gpus import GpuPool, GpuUseReader, detect_gpus, simulated_gpus
from treadle.shuttle.live.host import SandboxHost
from treadle.shuttle.live.pool import WarmPool
from treadle.shuttle.metrics import ShuttleMetrics
from treadle.shuttle.microvm.runtime import MicrovmRuntime
from treadle.shuttle.runtimes import (
    Runtime,
    available_runtimes,
    gives_network,
    sweep_after_dead_shuttles,
)
from treadle.shuttle.sandbox import cleanup
from treadle.shuttle.settings import ShuttleSettings
from treadle.shuttle.supervisor import Supervisor

__all__ = ["Shuttle"]

log = logging.getLogger(__name__)

_WELCOME_TIMEOUT_S = 10.0
_OPEN_TIMEOUT_S = 10.0
_REFUSED = (401, 403)


# The node label that says how the microvm tier's VMs run (an operator's own value wins).
MICROVM_ACCEL_LABEL = "microvm-accel"


def _warm_pool(
    settings: ShuttleSettings, runtime: Runtime | None, workdir: Path
) -> WarmPool | None:
    """The microvm tier's warm pool, where the tier is here and the operator asked for one."""
    if settings.microvm_warm == 0 or not isinstance(runtime, MicrovmRuntime):
        return None
    pool = WarmPool(
        runtime.launcher,
        per_shape=settings.microvm_warm,
        budget_mib=settings.microvm_warm_mib,
        workdir=workdir,
    )
    runtime.launcher.pool = pool
    log.info(
        "microvm warm pool: %d per shape, within %d MiB",
        settings.microvm_warm,
        settings.microvm_warm_mib,
    )
    return pool


class Shuttle:
    """`await Shuttle(settings).run()` runs until cancelled; on the way out it kills every
    execution it still runs. `runtimes` replaces the detected ones (tests, embedding)."""

    def __init__(
        self, settings: ShuttleSettings, *, runtimes: Mapping[Tier, Runtime] | None = None
    ) -> None:
        self._settings = settings
        self._runtimes = dict(runtimes) if runtimes is not None else None
        self._node_credential_refused = False
        self._perf_score = 1.0
        self._network_tiers: list[Tier] = []
        self._labels = dict(settings.labels)
        self._sandboxes = SandboxHost({}, Path("/nonexistent"))  # replaced in `_run`
        self.metrics = ShuttleMetrics()
        self._usage: UsageOutbox | None = None  # made in `_run`

    async def run(self) -> None:
        settings = self._settings
        runtimes = self._runtimes
        tried = runtimes is None
        if runtimes is None:
            # Trial runs and a sweep can take seconds: off the event loop, which an
            # embedding program may share.
            runtimes = await asyncio.to_thread(available_runtimes, settings)
        if settings.runtimes is not None:
            runtimes = {tier: rt for tier, rt in runtimes.items() if tier in settings.runtimes}
            if not runtimes:
                asked = ", ".join(sorted(settings.runtimes))
                every = settings.model_copy(update={"runtimes": None})
                working = await asyncio.to_thread(available_runtimes, every)
                raise ShuttleError(
                    f"none of the runtimes asked for ({asked}) works on this host; "
                    f"these do: {', '.join(sorted(working)) or 'none'}"
                )
        if not runtimes:
            raise ShuttleError(
                "no isolation runtime is available on this host. For development only, "
                "pass --allow-process-runtime (TREADLE_SHUTTLE_ALLOW_PROCESS_RUNTIME=1) to run "
                "code as plain processes, without any isolation."
            )
        if settings.token is None and load_credential(settings.home) is None:
            raise ShuttleError(
                "no credential to join Weaver: pass --token (TREADLE_SHUTTLE_TOKEN) with the "
                "join token that Weaver wrote to $TREADLE_HOME/join.token. After the first "
                f"registration the node credential is kept in {settings.home}/node.json."
            )
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        sweep = (
            asyncio.ensure_future(asyncio.to_thread(sweep_after_dead_shuttles, settings))
            if tried
            else None
        )
        try:
            with _exclusive(settings.home):
                await self._run(settings, runtimes)
        finally:
            if sweep is not None:
                sweep.cancel()  # its thread runs on to the end of its commands

    async def _run(self, settings: ShuttleSettings, runtimes: dict[Tier, Runtime]) -> None:
        work_root = settings.home / "work"
        # Left over by a previous run that died: Weaver has given up on those attempts.
        shutil.rmtree(work_root, ignore_errors=True)
        work_root.mkdir(mode=0o700)
        reaper.become_subreaper()
        if settings.simulated_gpus is not None:
            gpus = simulated_gpus(settings.simulated_gpus)
            log.warning("advertising %s simulated GPUs: they do not exist", settings.simulated_gpus)
        else:
            gpus = await asyncio.to_thread(detect_gpus)
        capacity = detect_capacity(settings, gpus)
        microvm = runtimes.get(Tier.MICROVM)
        if isinstance(microvm, MicrovmRuntime):
            # How its VMs run, for people and placement rules: `kvm`, or `tcg` (emulation).
            self._labels.setdefault(MICROVM_ACCEL_LABEL, microvm.launcher.accel)
        pool = _warm_pool(settings, microvm, work_root)
        if pool is not None:
            # What the pool's VMs hold is not there for placed work.
            memory = max(1, capacity.memory_mib - settings.microvm_warm_mib)
            capacity = capacity.model_copy(update={"memory_mib": memory})
            self.metrics.watch_pool(pool.stats)
        tiers = sorted(runtimes, key=lambda tier: tier.strength)
        measured = settings.perf_score
        if measured is None:
            measured = await asyncio.to_thread(cpu_score)
        self._perf_score = measured
        self._network_tiers = [tier for tier in tiers if gives_network(runtimes[tier])]
        usage = UsageOutbox(settings.home / "usage.journal") if settings.metering else None
        self._usage = usage
        supervisor = Supervisor(
            runtimes,
            work_root,
            max_unacked=settings.max_unacked_bytes,
            gpus=GpuPool(gpus),
            metrics=self.metrics,
            usage=usage,
            usage_interval_s=settings.usage_interval_s,
            gpu_use=GpuUseReader() if gpus and settings.simulated_gpus is None else None,
        )
        self._sandboxes = SandboxHost(
            runtimes, work_root, usage=usage, usage_interval_s=settings.usage_interval_s
        )
        self.metrics.count_workloads(supervisor.held)
        self.metrics.count_workloads(self._sandboxes.held)
        if settings.metrics_addr is not None:
            self.metrics.serve(settings.metrics_addr)
            log.info("metrics at http://%s/metrics", settings.metrics_addr)
        log.info(
            "shuttle %s: runtimes %s, capacity %s, Weaver at %s",
            settings.name,
            ",".join(tiers),
            capacity,
            ", ".join(settings.agent_urls),
        )
        watchdog = asyncio.create_task(stall.watch())
        try:
            await self._stay_connected(supervisor, capacity, tiers)
        finally:
            watchdog.cancel()
            await self._sandboxes.stop_all()
            await supervisor.shutdown()
            if pool is not None:
                await pool.close()
            if usage is not None:
                usage.close()
            if not await cleanup.drain():
                log.warning("cleanup after some workloads did not finish; the next start sweeps")

    async def _stay_connected(
        self, supervisor: Supervisor, capacity: Resources, tiers: list[Tier]
    ) -> None:
        urls = self._settings.agent_urls
        backoff = Backoff()
        turn = -1
        while True:
            # Each new try goes to the next replica: the last one may be what went away.
            turn += 1
            url = urls[turn % len(urls)]
            bearer, what = self._credential()
            try:
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {bearer}"},
                    compression=None,  # latency over bandwidth; output is small or incompressible
                    max_size=MAX_FRAME_BYTES,
                    open_timeout=_OPEN_TIMEOUT_S,
                ) as ws:
                    await self._session(ws, supervisor, capacity, tiers, backoff)
                log.warning("Weaver closed the link; reconnecting")
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status not in _REFUSED:
                    log.warning("Weaver answered the handshake with HTTP %d", status)
                elif what == "node credential" and self._settings.token is not None:
                    log.warning(
                        "Weaver refused the node credential (HTTP %d); registering again with "
                        "the join token",
                        status,
                    )
                    self._node_credential_refused = True
                    turn -= 1  # the same replica, with the other credential
                    continue
                else:
                    self._node_credential_refused = False
                    delay = backoff.longest()
                    log.error(
                        "Weaver refused the %s (HTTP %d): check --token; retrying in %.1fs",
                        what,
                        status,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
            except ConnectionClosed as exc:
                log.warning("link to Weaver lost: %s", exc)
            except (OSError, TimeoutError, WebSocketException, ProtocolError) as exc:
                log.warning("cannot reach Weaver at %s: %s", url, exc)
            await asyncio.sleep(backoff.next())

    def _credential(self) -> tuple[str, str]:
        """The bearer to present and what it is, for log messages."""
        stored = load_credential(self._settings.home)
        token = self._settings.token
        if stored is not None and not (self._node_credential_refused and token is not None):
            return stored.bearer, "node credential"
        if token is not None:
            return token, "join token"
        # run() checked that one existed; the file has been removed since.
        return "", "missing credential"

    async def _session(
        self,
        ws: ClientConnection,
        supervisor: Supervisor,
        capacity: Resources,
        tiers: list[Tier],
        backoff: Backoff,
    ) -> None:
        settings = self._settings
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            name=settings.name,
            capacity=capacity,
            runtimes=tiers,
            labels=self._labels,
            region=settings.region,
            zone=settings.zone,
            provider=settings.provider,
            price_per_hour=settings.price_per_hour,
            country=settings.country,
            spot=settings.spot,
            spot_price_per_hour=settings.spot_price_per_hour,
            perf_score=self._perf_score,
            taints=settings.taints,
            network_tiers=self._network_tiers,
            workloads=self._held(supervisor),
        )
        await ws.send(encode(hello))
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the frame does, and Shuttle would then outlive its own cancellation.
        async with asyncio.timeout(_WELCOME_TIMEOUT_S):
            welcome = decode_from_weaver(await ws.recv())
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"Weaver sent {welcome.type!r} before welcome")
        if welcome.protocol != PROTOCOL_VERSION:
            raise ShuttleError(
                f"Weaver speaks agent protocol {welcome.protocol}, this Shuttle speaks "
                f"{PROTOCOL_VERSION}: upgrade the older of the two"
            )
        if welcome.node_secret is not None:
            save_credential(settings.home, NodeCredential(welcome.node_id, welcome.node_secret))
            self._node_credential_refused = False
        log.info("connected to Weaver as node %s", welcome.node_id)
        backoff.reset()
        self.metrics.connects.inc()
        self.metrics.connected.set(1)

        link = _Link(ws)
        # Usage first: an exit replayed below is priced when it lands.
        if self._usage is not None:
            self._usage.attach(link.send)
        supervisor.attach(link.send)
        self._sandboxes.attach(link.send)
        heartbeat = asyncio.create_task(self._heartbeat(link, supervisor, welcome.heartbeat_s))
        try:
            handlers = self._handlers(supervisor)
            async for raw in ws:
                self._dispatch(handlers, raw)
        finally:
            self.metrics.connected.set(0)
            if self._usage is not None:
                self._usage.detach()
            supervisor.detach()
            self._sandboxes.detach()
            heartbeat.cancel()
            await link.close()
            await asyncio.wait([heartbeat])

    @staticmethod
    def _dispatch(handlers: Mapping[type, Callable[[Any], None]], raw: str | bytes) -> None:
        try:
            message = decode_from_weaver(raw)
        except ProtocolError as exc:
            log.warning("ignoring a frame outside the protocol: %s", exc.details)
            return
        handler = handlers.get(type(message))
        if handler is None:
            log.warning("ignoring an unexpected %r frame", message.type)
            return
        handler(message)

    def _handlers(self, supervisor: Supervisor) -> dict[type, Callable[[Any], None]]:
        """What each frame from Weaver is for: executions go to the supervisor, sandboxes
        and their streams to the sandbox host."""
        host = self._sandboxes
        return {
            Assign: lambda m: supervisor.assign(m.spec),
            Ack: supervisor.ack,
            Cancel: lambda m: supervisor.cancel(m.id, m.attempt),
            UsageAck: self._usage_ack,
            SandboxStart: lambda m: host.start(m.spec),
            SandboxControl: host.control,
            ExecStart: host.exec_start,
            FileStart: host.file_start,
            ProcessCall: host.process_call,
            PortStart: host.port_start,
            StreamInput: host.stream_input,
            StreamWindow: host.stream_window,
            StreamSignal: host.stream_signal,
            StreamResize: host.stream_resize,
            StreamDetach: lambda m: host.stream_detach(m.stream),
        }

    def _usage_ack(self, ack: UsageAck) -> None:
        if self._usage is not None:
            self._usage.ack(ack)

    def _held(self, supervisor: Supervisor) -> list[WorkloadRef]:
        return [*supervisor.held(), *self._sandboxes.held()]

    async def _heartbeat(self, link: _Link, supervisor: Supervisor, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            link.send(encode(Heartbeat(workloads=self._held(supervisor))))
            # Orphans that outlived their execution by more than the runtime's own sweep.
            reaper.reap_orphans()


@contextlib.contextmanager
def _exclusive(home: Path) -> Iterator[None]:
    """Hold `home/lock` while running: two Shuttles on one home would share a node identity
    and delete each other's work directories."""
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShuttleError(
                f"another Shuttle is running with home {home}; give each one its own --home"
            ) from None
        yield
    finally:
        os.close(fd)


class _Link:
    """Frames go out in the order they are queued, through one writer task, so that callers
    never wait for the network (and never interleave)."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._queue: deque[str] = deque()
        self._ready = asyncio.Event()
        self._pump = asyncio.create_task(self._run())

    def send(self, frame: str) -> None:
        self._queue.append(frame)
        self._ready.set()

    async def close(self) -> None:
        self._pump.cancel()
        await asyncio.wait([self._pump])

    async def _run(self) -> None:
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    await self._ws.send(self._queue.popleft())
        except ConnectionClosed:
            pass  # what was queued is replayed on the next link; the reader sees the close
