"""Shuttle against a small real WebSocket server playing Weaver's part."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import stat
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Assign,
    AssignSpec,
    Cancel,
    Chunk,
    Exited,
    Heartbeat,
    Hello,
    Output,
    ShuttleMessage,
    Started,
    UsageAck,
    UsageKey,
    UsageReport,
    Welcome,
    WorkloadRef,
    decode_from_shuttle,
    encode,
)
from treadle.shuttle import Shuttle, ShuttleError, ShuttleSettings, runtimes
from treadle.shuttle.credentials import NodeCredential, save_credential

PY = "/usr/bin/python3"
TOKEN = "join-123"
M = TypeVar("M")


class FakeWeaver:
    def __init__(self) -> None:
        self.connections: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.bearers: list[str] = []  # every handshake's Authorization, refused ones included
        self.refuse: set[str] = set()
        self.url = ""
        self.shuttles: list[asyncio.Task[None]] = []  # those started against it

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        bearer = request.headers.get("Authorization", "")
        self.bearers.append(bearer)
        if bearer in self.refuse:
            return connection.respond(HTTPStatus.FORBIDDEN, "refused\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        await self.connections.put(ws)
        await ws.wait_closed()

    async def accept(self) -> ServerConnection:
        """The next Shuttle's connection. A Shuttle that stops instead fails this at once
        with its error, and a wait past 10 s with every stopped Shuttle's."""
        connection = asyncio.ensure_future(self.connections.get())
        running = {task for task in self.shuttles if not task.done()}
        await asyncio.wait({connection, *running}, timeout=10, return_when="FIRST_COMPLETED")
        if not connection.done():
            connection.cancel()
            stopped = [task for task in self.shuttles if task.done() and not task.cancelled()]
            for task in stopped:
                if task in running:
                    task.result()  # raises what stopped it
            errors = [task.exception() for task in stopped]
            raise AssertionError(
                f"no Shuttle connected in 10 s; stopped ones raised {errors}; "
                f"where the running ones are:\n{_where(running)}"
            )
        return connection.result()


def _where(tasks: set[asyncio.Task[None]]) -> str:
    """Each task's stack, and every thread's (a task may wait on one of them)."""
    out = io.StringIO()
    for task in tasks:
        task.print_stack(file=out)
    for ident, frame in sys._current_frames().items():
        out.write(f"thread {ident}:\n{''.join(traceback.format_stack(frame))}")
    return out.getvalue()


@pytest.fixture
async def weaver() -> AsyncIterator[FakeWeaver]:
    fake = FakeWeaver()
    async with serve(
        fake.handler, "127.0.0.1", 0, process_request=fake.process_request, compression=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        fake.url = f"http://127.0.0.1:{port}"
        yield fake


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
async def start_shuttle(
    weaver: FakeWeaver, home: Path
) -> AsyncIterator[Callable[..., asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(**overrides: Any) -> asyncio.Task[None]:
        fields: dict[str, Any] = {
            "weaver_url": weaver.url,
            "token": TOKEN,
            "home": home,
            "name": "node-a",
            "allow_process_runtime": True,
            "runtimes": [Tier.PROCESS],
        }
        fields.update(overrides)
        task = asyncio.create_task(Shuttle(ShuttleSettings(**fields)).run())
        tasks.append(task)
        weaver.shuttles.append(task)
        return task

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def receive(ws: ServerConnection, kind: type[M]) -> M:
    """The next frame, which must be a `kind` (heartbeats and usage reports are skipped
    unless asked for)."""
    while True:
        message: ShuttleMessage = decode_from_shuttle(await asyncio.wait_for(ws.recv(), 10))
        if isinstance(message, (Heartbeat, UsageReport)) and kind is not type(message):
            continue
        assert isinstance(message, kind), message
        return message


async def welcome(
    weaver: FakeWeaver, *, secret: str | None = "s3cret", heartbeat_s: float = 60
) -> tuple[ServerConnection, Hello]:
    ws = await weaver.accept()
    hello = await receive(ws, Hello)
    await ws.send(
        encode(
            Welcome(
                protocol=PROTOCOL_VERSION,
                node_id="nd_1",
                node_secret=secret,
                heartbeat_s=heartbeat_s,
            )
        )
    )
    return ws, hello


def assign(argv: list[str], *, id: str = "ex_1", attempt: int = 1, **extra: Any) -> str:
    spec = AssignSpec(
        id=id,
        attempt=attempt,
        tenant_id="tn_1",
        function="fn",
        version=1,
        argv=argv,
        timeout_s=30,
        resources=Resources(),
        isolation=Tier.PROCESS,
        **extra,
    )
    return encode(Assign(spec=spec))


async def test_a_shuttle_without_oci_tiers_connects_before_it_sweeps_up_after_dead_ones(
    weaver: FakeWeaver,
    start_shuttle: Callable[..., asyncio.Task[None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What dead Shuttles' containers left is swept up, but the sweep (each of the tools'
    commands may take up to 30 s) does not hold up a Shuttle that starts no container."""
    release, finished = threading.Event(), threading.Event()

    def slow_sweep() -> None:
        release.wait(30)
        finished.set()

    monkeypatch.setattr(runtimes, "sweep_dead_shuttles", slow_sweep)
    try:
        start_shuttle()
        await welcome(weaver)
        assert not finished.is_set()  # connected while the sweep still runs
    finally:
        release.set()
    assert await asyncio.to_thread(finished.wait, 10)  # and it runs to its end


async def test_registers_runs_echo_and_reports(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]], home: Path
) -> None:
    start_shuttle()
    ws, hello = await welcome(weaver)

    assert ws.request is not None
    assert ws.request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert hello.protocol == PROTOCOL_VERSION
    assert hello.name == "node-a"
    assert hello.runtimes == [Tier.PROCESS]
    assert hello.workloads == []
    assert hello.capacity.cpu_millicores >= 1000

    await ws.send(assign(["/bin/echo", "13"]))
    assert await receive(ws, Started) == Started(id="ex_1", attempt=1)
    output = await receive(ws, Output)
    assert output.chunks == [Chunk(stream="stdout", seq=0, data="13\n")]
    exited = await receive(ws, Exited)
    assert (exited.exit_code, exited.reason, exited.chunks) == (0, None, 1)

    credential = home / "node.json"
    assert json.loads(credential.read_text()) == {"node_id": "nd_1", "node_secret": "s3cret"}
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600

    # Acked in full: forgotten, so the next Hello no longer lists it.
    await ws.send(encode(Ack(id="ex_1", attempt=1, seq=0, exited=True)))
    await ws.close()
    ws, hello = await welcome(weaver)
    assert hello.workloads == []


async def test_unacked_output_and_exit_are_replayed_after_reconnect(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    start_shuttle()
    ws, _ = await welcome(weaver)
    await ws.send(assign(["/bin/echo", "13"]))
    await receive(ws, Started)
    first = await receive(ws, Output)
    first_exit = await receive(ws, Exited)
    await ws.close()  # before any ack

    ws, hello = await welcome(weaver, secret=None)

    assert ws.request is not None
    assert ws.request.headers["Authorization"] == "Bearer nd_1:s3cret"
    assert hello.workloads == [WorkloadRef(kind="execution", id="ex_1", generation=1)]
    assert await receive(ws, Output) == first
    assert await receive(ws, Exited) == first_exit


async def test_only_unacked_frames_are_replayed(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    start_shuttle()
    ws, _ = await welcome(weaver)
    # More than one read's worth (64 KiB), so at least two chunks.
    await ws.send(assign([PY, "-c", "print('x' * 100_000)"]))
    await receive(ws, Started)
    chunks: list[Chunk] = []
    while True:
        message = decode_from_shuttle(await asyncio.wait_for(ws.recv(), 10))
        if isinstance(message, Output):
            chunks += message.chunks
        elif isinstance(message, Exited):
            exited = message
            break
    assert "".join(c.data for c in chunks) == "x" * 100_000 + "\n"
    assert len(chunks) >= 2
    assert [c.seq for c in chunks] == list(range(exited.chunks))
    await ws.send(encode(Ack(id="ex_1", attempt=1, seq=0)))
    await ws.close()

    ws, hello = await welcome(weaver)

    assert hello.workloads == [WorkloadRef(kind="execution", id="ex_1", generation=1)]
    replayed = await receive(ws, Output)
    assert replayed.chunks == chunks[1:]
    assert await receive(ws, Exited) == exited


async def test_cancel_kills_a_running_attempt(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    start_shuttle()
    ws, _ = await welcome(weaver)
    await ws.send(assign(["sleep", "30"]))
    await receive(ws, Started)

    await ws.send(encode(Cancel(id="ex_1", attempt=1)))
    await ws.send(encode(Cancel(id="ex_unknown", attempt=1)))  # ignored

    exited = await receive(ws, Exited)
    assert exited.reason == "cancelled"
    assert exited.exit_code == -9
    assert exited.chunks == 0


async def test_duplicate_assign_is_ignored(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    start_shuttle()
    ws, _ = await welcome(weaver)
    await ws.send(assign(["/bin/echo", "once"]))
    await ws.send(assign(["/bin/echo", "once"]))
    await ws.send(assign(["/bin/echo", "other"], id="ex_2"))

    seen: list[str] = []
    while seen.count("exited") < 2:
        message = decode_from_shuttle(await asyncio.wait_for(ws.recv(), 10))
        seen.append(message.type)
    assert seen.count("started") == 2


async def test_refused_node_credential_falls_back_to_join_token(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]], home: Path
) -> None:
    save_credential(home, NodeCredential("nd_old", "stale"))
    weaver.refuse.add("Bearer nd_old:stale")
    start_shuttle()

    ws, _ = await welcome(weaver, secret="fresh")
    await ws.send(assign(["/bin/true"]))
    await receive(ws, Started)  # so the Welcome has been handled

    assert weaver.bearers == ["Bearer nd_old:stale", f"Bearer {TOKEN}"]
    assert json.loads((home / "node.json").read_text())["node_secret"] == "fresh"


async def test_heartbeats_list_what_the_node_holds(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    start_shuttle()
    ws, _ = await welcome(weaver, heartbeat_s=0.05)
    await ws.send(assign(["sleep", "30"]))
    await receive(ws, Started)

    beat = await receive(ws, Heartbeat)

    assert beat.workloads == [WorkloadRef(kind="execution", id="ex_1", generation=1)]


async def test_output_beyond_the_unacked_window_waits_for_acks(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    window = 64 * 1024
    start_shuttle(max_unacked_bytes=window)
    ws, _ = await welcome(weaver)
    total = 1024 * 1024
    await ws.send(assign([PY, "-c", f"import sys; sys.stdout.write('x' * {total})"]))
    await receive(ws, Started)

    received = 0
    last_seq = -1
    while received <= window:
        output = await receive(ws, Output)
        received += sum(len(c.data) for c in output.chunks)
        last_seq = output.chunks[-1].seq
    # Without acks nothing more comes: the program is blocked on its pipe.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), 0.3)
    assert received < 2 * window + 64 * 1024

    seqs = []
    while True:
        await ws.send(encode(Ack(id="ex_1", attempt=1, seq=last_seq)))
        message = decode_from_shuttle(await asyncio.wait_for(ws.recv(), 10))
        if isinstance(message, Exited):
            break
        if isinstance(message, UsageReport):  # the attempt's usage, right before its exit
            continue
        assert isinstance(message, Output)
        received += sum(len(c.data) for c in message.chunks)
        seqs += [c.seq for c in message.chunks]
        last_seq = message.chunks[-1].seq
    assert received == total
    assert message.exit_code == 0
    assert message.chunks == last_seq + 1
    assert seqs == sorted(seqs)


async def test_protocol_mismatch_is_a_clear_error(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    task = start_shuttle()
    ws = await weaver.accept()
    await receive(ws, Hello)
    await ws.send(encode(Welcome(protocol=PROTOCOL_VERSION + 1, node_id="nd_1", heartbeat_s=1)))

    with pytest.raises(ShuttleError, match="protocol"):
        await asyncio.wait_for(task, 10)


async def test_refuses_to_start_without_a_credential(weaver: FakeWeaver, home: Path) -> None:
    settings = ShuttleSettings(
        weaver_url=weaver.url, token=None, home=home, allow_process_runtime=True
    )
    with pytest.raises(ShuttleError, match="--token"):
        await Shuttle(settings).run()


async def test_refuses_to_start_without_a_runtime(
    weaver: FakeWeaver, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(home))  # no bubblewrap: no sandboxed tier either
    settings = ShuttleSettings(weaver_url=weaver.url, token=TOKEN, home=home)
    with pytest.raises(ShuttleError, match="--allow-process-runtime"):
        await Shuttle(settings).run()


async def test_refuses_a_second_shuttle_on_the_same_home(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    start_shuttle()
    await welcome(weaver)

    with pytest.raises(ShuttleError, match="another Shuttle"):
        await start_shuttle()


async def test_a_node_given_several_replicas_tries_the_next_when_one_is_gone(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]]
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
        start_shuttle(weaver_url=f"{gone},{weaver.url}")
        ws, hello = await welcome(weaver)
    assert hello.name == "node-a"
    await ws.close()


async def test_offering_only_tiers_that_do_not_work_here_is_a_clear_error(home: Path) -> None:
    settings = ShuttleSettings(
        weaver_url="http://127.0.0.1:9",
        token=TOKEN,
        home=home,
        allow_process_runtime=True,
        runtimes=[Tier.MICROVM],
    )
    with pytest.raises(ShuttleError, match=r"asked for \(microvm\).*these do: .*process"):
        await Shuttle(settings).run()


async def test_an_attempt_s_usage_goes_before_its_exit_until_acknowledged(
    weaver: FakeWeaver, start_shuttle: Callable[..., asyncio.Task[None]], home: Path
) -> None:
    start_shuttle()
    ws, _ = await welcome(weaver)
    await ws.send(assign([PY, "-c", "pass"]))
    await receive(ws, Started)
    report = await receive(ws, UsageReport)
    (record,) = report.records
    assert (record.kind, record.id, record.generation, record.seq) == ("execution", "ex_1", 1, 1)
    assert record.final and record.wall_s > 0 and record.end >= record.start
    exited = await receive(ws, Exited)
    await ws.send(encode(Ack(id="ex_1", attempt=1, exited=True)))
    await ws.close()

    # Not acknowledged: sent again on the next link, first.
    ws, _ = await welcome(weaver)
    assert await receive(ws, UsageReport) == report
    key = UsageKey(kind="execution", id="ex_1", generation=1, seq=1)
    await ws.send(encode(UsageAck(keys=[key])))
    # Acknowledged: the journal says so, and the next link has nothing to send again.
    journal = home / "usage.journal"
    for _ in range(200):
        if '"acked"' in journal.read_text():
            break
        await asyncio.sleep(0.05)
    await ws.close()
    ws, _ = await welcome(weaver)
    await ws.send(assign([PY, "-c", "pass"], id="ex_2"))
    while True:  # the first frame but heartbeats: ex_2's start, nothing of ex_1 before it
        first = decode_from_shuttle(await asyncio.wait_for(ws.recv(), 10))
        if not isinstance(first, Heartbeat):
            break
    assert isinstance(first, Started) and first.id == "ex_2", first
    assert exited.id == "ex_1"
