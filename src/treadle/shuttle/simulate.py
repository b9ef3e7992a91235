"""Simulated Shuttles: many node agents in one process, for measuring Weaver alone and for
testing the control plane at fleet scale.

Each one is a real agent connection: it dials `/v1/agent` with the join token, says hello,
keeps its heartbeat, and answers what Weaver sends with the frames a Shuttle would. Its
runtime does nothing: an assigned execution is reported started and then ended with exit code
0 and no output at once, so no program runs, nobody's code included. What it measures is the
path every execution takes through Weaver: the API, the store, placement and the agent link.

    python -m treadle.shuttle.simulate --weaver http://127.0.0.1:8700 --nodes 1000

(the join token from TREADLE_SHUTTLE_TOKEN or --token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from treadle import serving
from treadle.domain.resources import Resources, Tier
from treadle.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Assign,
    Cancel,
    Exited,
    Heartbeat,
    Hello,
    Started,
    Welcome,
    WorkloadRef,
    decode_from_weaver,
    encode,
)
from treadle.protocol.limits import MAX_FRAME_BYTES

__all__ = ["SimulatedFleet", "SimulatedNode", "main"]

log = logging.getLogger(__name__)
# Connections opened at once while a fleet joins: a thousand handshakes at the same instant
# would be a test of the listen backlog, not of Weaver.
_JOINING_AT_ONCE = 50
# Room for many thousands of small executions at once: the point is Weaver, not packing.
_ROOMY = Resources(cpu_millicores=64_000, memory_mib=256 * 1024, disk_mib=64 * 1024 * 1024)


@dataclass
class SimulatedNode:
    """One simulated agent; `run` until cancelled, reconnecting after a break."""

    weaver_url: str
    token: str
    name: str
    capacity: Resources
    tiers: list[Tier]
    labels: dict[str, str] = field(default_factory=dict)
    credential: str | None = None  # `node_id:secret`, once Weaver gave it
    node_id: str | None = None
    assigned: int = 0
    ended: int = 0
    # Attempts reported ended and not yet acknowledged: the node holds them until then.
    held: dict[tuple[str, int], None] = field(default_factory=dict)
    joined: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except (ConnectionClosed, OSError) as exc:
                log.debug("%s: link lost (%s); dialing again", self.name, exc)
            await asyncio.sleep(0.5)

    async def _session(self) -> None:
        url = self.weaver_url.replace("http", "ws", 1).rstrip("/") + "/v1/agent"
        bearer = self.credential or self.token
        async with connect(
            url,
            additional_headers={"Authorization": f"Bearer {bearer}"},
            compression=None,
            max_size=MAX_FRAME_BYTES,
            open_timeout=30,
        ) as ws:
            hello = Hello(
                protocol=PROTOCOL_VERSION,
                name=self.name,
                capacity=self.capacity,
                runtimes=self.tiers,
                labels=self.labels,
                workloads=self._workloads(),
            )
            await ws.send(encode(hello))
            welcome = decode_from_weaver(await ws.recv())
            if not isinstance(welcome, Welcome):
                raise ConnectionClosed(None, None)
            self.node_id = welcome.node_id
            if welcome.node_secret is not None:
                self.credential = f"{welcome.node_id}:{welcome.node_secret}"
            self.joined.set()
            beat = asyncio.create_task(self._heartbeat(ws, welcome.heartbeat_s))
            try:
                async for raw in ws:
                    await self._handle(ws, raw)
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat

    async def _handle(self, ws: ClientConnection, raw: str | bytes) -> None:
        message = decode_from_weaver(raw)
        if isinstance(message, Assign):
            spec = message.spec
            key = (spec.id, spec.attempt)
            if key in self.held:
                return  # placed again after a reconnect: its end is already reported
            self.assigned += 1
            self.held[key] = None
            await ws.send(encode(Started(id=spec.id, attempt=spec.attempt)))
            await ws.send(encode(Exited(id=spec.id, attempt=spec.attempt, exit_code=0, chunks=0)))
            self.ended += 1
        elif (isinstance(message, Ack) and message.exited) or isinstance(message, Cancel):
            # Stored (or given up on): the node holds it no longer.
            self.held.pop((message.id, message.attempt), None)

    async def _heartbeat(self, ws: ClientConnection, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await ws.send(encode(Heartbeat(workloads=self._workloads())))

    def _workloads(self) -> list[WorkloadRef]:
        return [
            WorkloadRef(kind="execution", id=execution_id, generation=attempt)
            for execution_id, attempt in self.held
        ]


class SimulatedFleet:
    """`count` simulated nodes named `{prefix}-{n}`, each with `capacity`."""

    def __init__(
        self,
        weaver_url: str,
        token: str,
        count: int,
        *,
        capacity: Resources | None = None,
        tiers: list[Tier] | None = None,
        prefix: str = "sim",
    ) -> None:
        capacity = capacity or _ROOMY
        self.nodes = [
            SimulatedNode(weaver_url, token, f"{prefix}-{n}", capacity, tiers or [Tier.NAMESPACE])
            for n in range(count)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect every node, a few at a time; returns once all have joined."""
        for at in range(0, len(self.nodes), _JOINING_AT_ONCE):
            wave = self.nodes[at : at + _JOINING_AT_ONCE]
            self._tasks += [asyncio.create_task(node.run()) for node in wave]
            await asyncio.gather(*(node.joined.wait() for node in wave))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    @property
    def ended(self) -> int:
        return sum(node.ended for node in self.nodes)


async def _serve(args: argparse.Namespace, token: str) -> None:
    fleet = SimulatedFleet(
        args.weaver,
        token,
        args.nodes,
        capacity=Resources(cpu_millicores=args.cpu, memory_mib=args.memory, disk_mib=args.disk),
        prefix=args.prefix,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await fleet.start()
    print(f"{args.nodes} simulated nodes joined", flush=True)
    await stop.wait()
    await fleet.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m treadle.shuttle.simulate",
        description="Simulated Shuttles whose runtime does nothing, for measuring Weaver alone.",
    )
    parser.add_argument("--weaver", required=True, help="Weaver's URL")
    parser.add_argument("--token", help="the join token (default: $TREADLE_SHUTTLE_TOKEN)")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--cpu", type=int, default=64_000, help="millicores per node")
    parser.add_argument("--memory", type=int, default=256 * 1024, help="MiB per node")
    parser.add_argument("--disk", type=int, default=_ROOMY.disk_mib, help="MiB per node")
    parser.add_argument("--prefix", default="sim", help="node names are PREFIX-N")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("TREADLE_SHUTTLE_TOKEN")
    if not token:
        parser.error("a join token is needed: --token or TREADLE_SHUTTLE_TOKEN")
    serving.run(_serve(args, token))


if __name__ == "__main__":
    main()
