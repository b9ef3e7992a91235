"""A sandbox and the processes exec'd in it outlive what happens around them: a node link cut
and restored within the grace period, a Weaver restart, and a client that stops reading a
huge download. Real Weaver and Shuttle processes over loopback, real namespace sandboxes.

A process is stepped from the test by signals sent from this host (the test runs as the
processes' host, which sees them by a marker argument), never by time: it waits for SIGUSR1
before printing on, so the test decides what it prints while the link is up and what while
it is down."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from support.cluster import Cluster, eventually
from support.processes import pids_with
from support.proxy import Proxy
from support.sandboxes import (
    Follow,
    attached,
    create,
    follow,
    reaches,
    run,
    socket_to,
    start,
    status_of,
)

pytestmark = pytest.mark.integration

LINES = 50
# Prints 1..50, one line at a time (a tenth of a second apart: that is its work), and waits
# after line `$1` until it is sent SIGUSR1. Its marker ($0) is how the host finds it.
COUNTER = (
    'trap "go=1" USR1; i=1; while [ $i -le 50 ]; do echo $i; '
    'if [ $i -eq "$1" ]; then while [ -z "$go" ]; do sleep 0.02; done; fi; '
    "i=$((i+1)); [ $i -le 50 ] && sleep 0.1; done; exit 0"
)
LOST_LINK = "the link to the sandbox's node was lost"


def marker() -> str:
    return f"treadle-resilience-{uuid.uuid4().hex}"


def the_process(mark: str) -> int:
    """The host pid of the one process started with `mark` in its arguments."""
    found = eventually(lambda: pids_with(mark), what=f"the process {mark}")
    assert len(found) == 1, found
    return found[0]


def link_lost_noticed(shuttle_log: str, before: int) -> bool:
    """Whether the Shuttle logged, after offset `before` of its log, that its link to Weaver
    went: it says so once it has let go of the link's streams (`SandboxHost.detach`)."""
    said = shuttle_log[before:]
    return "link to Weaver lost" in said or "Weaver closed the link" in said


class LossyProxy(Proxy):
    """A `Proxy` that can also lose what the Shuttle sends while the connection stays up
    (`lose`): bytes towards Weaver are read and dropped, as on a network that drops packets
    before the connection is reset. `lost` counts them."""

    def __init__(self, upstream_port: int) -> None:
        self._losing = threading.Event()
        self._count = threading.Lock()
        self.lost = 0
        super().__init__(upstream_port)

    def lose(self) -> None:
        with self._count:
            self.lost = 0
        self._losing.set()

    def restore(self) -> None:
        self._losing.clear()
        super().restore()

    def _pump(  # type: ignore[override]
        self, source: Any, sink: Any, flowing: threading.Event
    ) -> None:
        towards_weaver = flowing is self._up
        try:
            while data := source.recv(65536):
                if towards_weaver and self._losing.is_set():
                    with self._count:
                        self.lost += len(data)
                    continue
                flowing.wait()
                sink.sendall(data)
        except OSError:
            pass  # the other side, or cut(), closed it
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(2)
                sock.close()


@pytest.fixture(scope="module")
def cut_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, LossyProxy]]:
    """A Weaver whose grace period is long (a cut link is a reconnect, not a lost node) and
    one namespace-tier Shuttle connected to it through a proxy."""
    cluster = Cluster(tmp_path_factory.mktemp("sandbox-cut"))
    proxy: LossyProxy | None = None
    try:
        cluster.start_weaver(process_tier=False, node_down_after_s="30")
        proxy = LossyProxy(cluster.port)
        cluster.start_shuttle("behind-proxy", "--runtime", "namespace", via=proxy.url)
        yield cluster, proxy
    finally:
        if proxy is not None:
            proxy.close()
        cluster.stop()


def _cut_and_restore(
    cluster: Cluster, proxy: Proxy, ws: ClientConnection, between: Callable[[], None] | None = None
) -> tuple[Follow, dict[str, Any]]:
    """Cut the link while `ws` follows a process; what the socket got after the cut; run
    `between` while the link is down (once the Shuttle has let go of it); restore it and
    wait for the node to be back."""
    shuttle = cluster.shuttles[-1]
    log_before = len(shuttle.output())
    proxy.cut()
    ended = follow(ws)
    eventually(
        lambda: link_lost_noticed(shuttle.output(), log_before),
        what="the Shuttle to let go of the cut link",
    )
    eventually(
        lambda: cluster.node_named("behind-proxy", connected=False),
        what="Weaver to let go of the cut link",
    )
    if between is not None:
        between()
    proxy.restore()
    node = eventually(
        lambda: cluster.node_named("behind-proxy", connected=True),
        timeout=30,
        what="the node to reconnect",
    )
    return ended, node


def test_a_cut_link_within_the_grace_keeps_the_sandbox_its_process_and_its_output(
    cut_cluster: tuple[Cluster, LossyProxy],
) -> None:
    cluster, proxy = cut_cluster
    mark = marker()
    with cluster.client() as api:
        sandbox = create(api, isolation="namespace")
        sid = sandbox["id"]
        placed = reaches(api, sid, "running")
        with socket_to(cluster, f"/v1/sandboxes/{sid}/exec") as ws:
            started = start(ws, cmd=["/bin/sh", "-c", COUNTER, mark, "20"], tag="counter")
            before = follow(ws, until=b"\n20\n")
            pid = the_process(mark)

            def release() -> None:
                # the rest is printed, and the process exits, while the link is down
                os.kill(pid, signal.SIGUSR1)
                eventually(lambda: not pids_with(mark), what="the process to finish")

            cut_off, node = _cut_and_restore(cluster, proxy, ws, between=release)
        # The client's stream ended with the link, saying so; the process did not.
        assert cut_off.exit is not None and cut_off.exit["error"] == LOST_LINK, cut_off
        assert cut_off.exit["exit_code"] is None
        before.stdout += cut_off.stdout

        # Not restarted: the same incarnation on the same node.
        after = status_of(api, sid)
        assert (after["status"], after["incarnation"], after["restarts"]) == ("running", 1, 0)
        assert after["node_id"] == placed["node_id"] == node["id"]

        # What it printed while nobody followed it was kept, and it ended well.
        with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/counter") as ws:
            assert attached(ws) == {"pid": started["pid"], "tag": "counter"}
            rest = follow(ws)
        assert rest.exit is not None and rest.exit["exit_code"] == 0, rest
        assert rest.exit["error"] is None
        assert before.lines + rest.lines == [str(i) for i in range(1, LINES + 1)]
        api.delete(f"/v1/sandboxes/{sid}")


def test_output_in_flight_when_the_link_drops_is_not_lost(
    cut_cluster: tuple[Cluster, LossyProxy],
) -> None:
    """The link first loses what the Shuttle sends (packets dropped, the connection up),
    then is cut. What the process printed meanwhile went out on the link and never reached
    Weaver: it must still reach the next client that attaches, in order, once."""
    cluster, proxy = cut_cluster
    mark = marker()
    # 2,000 lines of 100 random hex digits each: ~200 KB, far more than the heartbeats the
    # link also loses meanwhile, so that 100 KB lost proves the burst went out on the link.
    script = (
        "import os, signal, sys, time\n"
        "go = []\n"
        "signal.signal(signal.SIGUSR1, lambda *_: go.append(1))\n"
        "print(0, flush=True)\n"
        "while not go: time.sleep(0.02)\n"
        "for i in range(1, 2001): print(i, os.urandom(50).hex(), flush=True)\n"
    )
    with cluster.client() as api:
        sandbox = create(api, isolation="namespace")
        sid = sandbox["id"]
        with socket_to(cluster, f"/v1/sandboxes/{sid}/exec") as ws:
            start(ws, cmd=["python3", "-c", script, mark], tag="burst")
            before = follow(ws, until=b"0\n")
            pid = the_process(mark)
            proxy.lose()
            os.kill(pid, signal.SIGUSR1)
            # The Shuttle relays the burst into the link, which loses it.
            eventually(lambda: proxy.lost > 100_000, what="the burst to be sent and lost")
            eventually(lambda: not pids_with(mark), what="the process to finish")
            cut_off, _ = _cut_and_restore(cluster, proxy, ws)
        assert cut_off.exit is not None and cut_off.exit["error"] == LOST_LINK, cut_off
        got = before.lines + cut_off.lines
        with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/burst") as ws:
            attached(ws)
            rest = follow(ws)
        assert rest.exit is not None and rest.exit["exit_code"] == 0, rest
        numbers = [int(line.split()[0]) for line in got + rest.lines]
        missing = sorted(set(range(2001)) - set(numbers))
        assert numbers == list(range(2001)), (
            f"{len(numbers)} lines for 2001: {len(missing)} missing "
            f"({missing[:3]}…{missing[-3:]}), {len(numbers) - len(set(numbers))} repeated"
        )
        api.delete(f"/v1/sandboxes/{sid}")


def test_a_sandbox_and_its_running_process_outlive_a_weaver_restart(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    mark = marker()
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle("steady", "--runtime", "namespace")
        with cluster.client() as api:
            sandbox = create(api, isolation="namespace")
            sid = sandbox["id"]
            run(api, sid, "echo kept > note.txt")
            with socket_to(cluster, f"/v1/sandboxes/{sid}/exec") as ws:
                started = start(
                    ws,
                    cmd=["/bin/sh", "-c", 'echo before; read line; echo "got $line"', mark],
                    tag="survivor",
                )
                assert follow(ws, until=b"before\n").stdout == b"before\n"
        host_pid = the_process(mark)

        assert cluster.weaver is not None
        shuttle = cluster.shuttles[-1]
        log_before = len(shuttle.output())
        cluster.weaver.stop(signal.SIGKILL)
        eventually(
            lambda: link_lost_noticed(shuttle.output(), log_before),
            what="the Shuttle to let go of its link",
        )
        # Output written while Weaver is away (from this host, into the process's stdout).
        with open(f"/proc/{host_pid}/fd/1", "w") as stdout:
            stdout.write("during\n")
        cluster.start_weaver(process_tier=False)

        with cluster.client() as api:

            def listed() -> list[dict[str, Any]] | None:
                response = api.get(f"/v1/sandboxes/{sid}/processes")
                return response.json()["items"] if response.status_code == 200 else None

            items = eventually(listed, timeout=30, what="the node to reconnect and answer")
            mine = [p for p in items if p["tag"] == "survivor"]
            assert len(mine) == 1, items
            assert mine[0]["pid"] == started["pid"] and mine[0]["running"] is True, mine
            after = status_of(api, sid)
            assert (after["status"], after["incarnation"], after["restarts"]) == ("running", 1, 0)
            assert pids_with(mark) == [host_pid]

            # Output written while no client follows it is kept for the next one.
            run(api, sid, f"echo meanwhile > /proc/{started['pid']}/fd/1")
            with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/survivor") as ws:
                assert attached(ws) == {"pid": started["pid"], "tag": "survivor"}
                kept = follow(ws, until=b"meanwhile\n").stdout
                assert kept == b"during\nmeanwhile\n"
                ws.send(json.dumps({"stdin": base64.b64encode(b"go\n").decode()}))
                rest = follow(ws)
            assert rest.stdout == b"got go\n"
            assert rest.exit is not None and rest.exit["exit_code"] == 0, rest
            assert run(api, sid, ["cat", "note.txt"])["stdout"] == "kept\n"
            api.delete(f"/v1/sandboxes/{sid}")
    finally:
        cluster.stop()


GIB = 1024 * 1024 * 1024


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_download_nobody_reads_holds_back_nothing_else(tmp_path: Path) -> None:
    """A client reads the first chunk of a 1 GiB file and then stops reading, its response
    left open. Meanwhile the same sandbox and another one answer execs (with half a megabyte
    of output each), a function runs to its end, and the node's heartbeats keep coming; the
    download is held back, not buffered, and goes on once the reader reads again."""
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(heartbeat_s="0.2")
        cluster.start_shuttle(
            "busy", "--runtime", "namespace", "--runtime", "process", "--cpu", "8000"
        )
        with cluster.client() as api:
            big = create(
                api, isolation="namespace", resources={"memory_mib": 2048, "disk_mib": 2048}
            )
            other = create(api, isolation="namespace")
            made = run(api, big["id"], f"head -c {GIB} /dev/zero > big && wc -c < big")
            assert made["stdout"].strip() == str(GIB), made
            node = cluster.node_named("busy", connected=True)
            assert node is not None
            registered = api.post(
                "/v1/functions",
                json={"name": "hello", "command": ["/bin/echo", "hello"], "isolation": "process"},
            )
            assert registered.status_code in (200, 201), registered.text

            with (
                cluster.client() as reader,
                reader.stream(
                    "GET", f"/v1/sandboxes/{big['id']}/files/content", params={"path": "big"}
                ) as download,
            ):
                assert download.status_code == 200, download.read()
                chunks = download.iter_raw()
                first = next(chunks)
                assert first and first == bytes(len(first))
                # The reader stops here, its response open.

                assert run(api, big["id"], "echo same")["stdout"] == "same\n"
                assert run(api, other["id"], "echo other")["stdout"] == "other\n"
                for sandbox in (other, big):
                    counted = run(api, sandbox["id"], "seq 1 100000")
                    assert counted["stdout"].splitlines() == [str(i) for i in range(1, 100001)]
                invoked = api.post("/v1/functions/hello/invoke", params={"wait": 30}, json={})
                assert invoked.status_code == 200, invoked.text
                execution = invoked.json()
                assert (execution["state"], execution["exit_code"]) == ("success", 0)
                out = api.get(f"/v1/executions/{execution['id']}/output").json()
                assert out["stdout"] == "hello\n"

                heard: set[str] = set()

                def beating() -> bool:
                    seen = api.get(f"/v1/nodes/{node['id']}").json()
                    assert seen["connected"] is True and seen["state"] == "ready", seen
                    heard.add(seen["last_heartbeat"])
                    return len(heard) >= 4  # three intervals, at least

                eventually(beating, timeout=15, what="heartbeats while the download is held")
                assert status_of(api, big["id"])["status"] == "running"
                # Held back, not buffered: neither Weaver nor the Shuttle holds the file.
                assert cluster.weaver is not None
                for proc in (cluster.weaver, cluster.shuttles[-1]):
                    assert resident_mib(proc.pid) < 512, proc.args

                # The download goes on where the reader stopped, once it reads again.
                more = len(first)
                while more < 8 * 1024 * 1024:
                    chunk = next(chunks)
                    assert chunk == bytes(len(chunk))
                    more += len(chunk)
            # Given up midway: the sandbox's link is as good as before.
            assert run(api, big["id"], "echo after")["stdout"] == "after\n"
            for sandbox in (big, other):
                api.delete(f"/v1/sandboxes/{sandbox['id']}")
    finally:
        cluster.stop()
