"""Following output over WebSocket: a follower lets go when its client leaves.

Weaver runs under uvicorn in a thread of this process, so the test can look at its event
bus and see whether a follower still holds its subscription; the Shuttle is a real process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from support.cluster import PYTHON, Cluster, eventually
from treadle.domain.resources import Tier
from treadle.weaver.api.app import create_app
from treadle.weaver.core import Weaver
from treadle.weaver.events.bus import InProcessBus
from treadle.weaver.settings import WeaverSettings

pytestmark = pytest.mark.integration


class ThreadWeaver:
    """Weaver served as `treadle weaver` serves it, but on a thread of the test process."""

    def __init__(self, cluster: Cluster) -> None:
        # As Cluster.start_weaver does: the Shuttle offers only the process tier.
        settings = WeaverSettings(
            home=cluster.home, port=cluster.port, default_min_isolation=Tier.PROCESS
        )
        self.bus = InProcessBus()
        self.weaver = Weaver(settings, bus=self.bus)
        config = uvicorn.Config(
            create_app(settings, self.weaver),
            host=settings.host,
            port=settings.port,
            http="httptools",
            ws="websockets-sansio",
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def start(self) -> None:
        self.thread.start()
        eventually(lambda: self.server.started, what="weaver to listen")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def subscribers(self, topic: str) -> int:
        """Subscriptions to `topic`, counted on the server's own loop."""

        async def count() -> int:
            return self.bus.subscriber_count(topic)

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, ThreadWeaver]]:
    cluster = Cluster(tmp_path_factory.mktemp("follow"))
    weaver = ThreadWeaver(cluster)
    try:
        weaver.start()
        cluster.allow_process_tier("default")
        cluster.start_shuttle("node0")
        yield cluster, weaver
    finally:
        cluster.stop()
        weaver.stop()


def follow(cluster: Cluster, execution_id: str, key: str | None = None) -> Any:
    url = cluster.url.replace("http", "ws") + f"/v1/executions/{execution_id}/output"
    return ws_client.connect(
        url, additional_headers={"Authorization": f"Bearer {key or cluster.admin_key}"}
    )


def register(api: httpx.Client, name: str, command: list[str]) -> None:
    response = api.post("/v1/functions", json={"name": name, "command": command})
    assert response.status_code in (200, 201), response.text


def running(api: httpx.Client, name: str) -> str:
    execution = api.post(f"/v1/functions/{name}/invoke", json={}).json()
    eventually(
        lambda: api.get(f"/v1/executions/{execution['id']}").json()["state"] == "running",
        what="the execution to run",
    )
    return str(execution["id"])


def until_end(ws: Any) -> list[dict[str, Any]]:
    messages = []
    while True:
        message = json.loads(ws.recv(timeout=30))
        messages.append(message)
        if message["type"] == "end":
            return messages


@pytest.mark.parametrize("how", ["close", "drop"])
def test_follower_of_a_silent_execution_lets_go_when_its_client_leaves(
    served: tuple[Cluster, ThreadWeaver], how: str
) -> None:
    cluster, weaver = served
    with cluster.client() as api:
        register(api, f"silent-{how}", ["/bin/sleep", "60"])
        execution_id = running(api, f"silent-{how}")
        topic = f"output.{execution_id}"
        with follow(cluster, execution_id) as ws:
            eventually(lambda: weaver.subscribers(topic) == 1, what="the follower to subscribe")
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.3)  # silent: nothing to send yet
            if how == "drop":  # the connection just goes, with no closing handshake
                ws.socket.shutdown(socket.SHUT_RDWR)
        left = time.monotonic()
        eventually(lambda: weaver.subscribers(topic) == 0, timeout=5, what="the follower to go")
        # promptly: not on the next poll of the store, nor at the execution's end
        assert time.monotonic() - left < 1.0
        assert api.get(f"/v1/executions/{execution_id}").json()["state"] == "running"

        # the server still serves: a new follower sees the cancellation through to the end
        with follow(cluster, execution_id) as again:
            eventually(lambda: weaver.subscribers(topic) == 1, what="the new follower")
            assert api.post(f"/v1/executions/{execution_id}/cancel").status_code == 200
            messages = until_end(again)
            assert messages[-1]["execution"]["state"] == "cancelled"
            with pytest.raises(ConnectionClosed) as closed:
                again.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        eventually(lambda: weaver.subscribers(topic) == 0, timeout=5, what="release at end")


def test_many_frames_arrive_in_order_without_duplicates(
    served: tuple[Cluster, ThreadWeaver], tmp_path: Path
) -> None:
    cluster, weaver = served
    gate = tmp_path / "gate"
    count = 3000
    script = (
        "import os, sys, time\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        f"for i in range({count}): print(i, flush=True)\n"
    )
    with cluster.client() as api:
        register(api, "chatty", [PYTHON, "-c", script])
        execution_id = running(api, "chatty")
        with follow(cluster, execution_id) as ws:
            eventually(
                lambda: weaver.subscribers(f"output.{execution_id}") == 1,
                what="the follower to subscribe",
            )
            gate.touch()
            time.sleep(0.5)  # a slow reader: notifications pile up meanwhile
            messages = until_end(ws)
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["data"] for c in chunks).splitlines() == [str(i) for i in range(count)]
    assert messages[-1]["execution"]["state"] == "success"
    assert weaver.subscribers(f"output.{execution_id}") == 0


def test_follower_of_another_tenants_execution_is_refused_with_4404(
    served: tuple[Cluster, ThreadWeaver],
) -> None:
    cluster, weaver = served
    with cluster.client() as admin:
        key = admin.post("/v1/tenants", json={"name": "other"}).json()["api_key"]
        register(admin, "private", ["/bin/sleep", "60"])
        execution_id = running(admin, "private")
        with follow(cluster, execution_id, key) as ws:
            message = json.loads(ws.recv(timeout=10))
            assert message["error"]["code"] == "not_found"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
        assert weaver.subscribers(f"output.{execution_id}") == 0
        admin.post(f"/v1/executions/{execution_id}/cancel")
