"""Input a tenant or a node controls, made to hurt: each gets a clear refusal (or fails only
what it concerns) and breaks nothing else. A real Weaver and Shuttle; nodes that misbehave
are played by hand over the real agent socket."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.sync.client import ClientConnection

from conftest import STORES, store_settings
from support.cluster import PYTHON, Cluster, eventually
from treadle.domain.resources import Resources, Tier
from treadle.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Assign,
    AssignSpec,
    Cancel,
    Chunk,
    Hello,
    Output,
    Started,
    WeaverMessage,
    Welcome,
    decode_from_weaver,
    encode,
)
from treadle.protocol.limits import (
    INVALID_REPORT,
    MAX_JSON_DEPTH,
    RESULT_INVALID,
    output_marker,
)

pytestmark = pytest.mark.integration

MAX_OUTPUT = 1000
MAX_BODY = 64 * 1024
OUTPUT_KEYS = {"stdout", "stderr", "attempt", "complete", "next_seq"}


@pytest.fixture(scope="module", params=STORES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("hostile"))
    try:
        # A node played by hand sends no heartbeats: a long down-after keeps it up.
        c.start_weaver(
            max_output_bytes=str(MAX_OUTPUT),
            max_body_bytes=str(MAX_BODY),
            node_down_after_s="120",
            **store_settings(request),
        )
        c.start_shuttle("node0")
        yield c
    finally:
        c.stop()


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    return dict(body["error"])


def nested(depth: int) -> Any:
    """An object `depth` levels deep (the object itself is the first)."""
    value: Any = 0
    for _ in range(depth - 1):
        value = [value]
    return {"x": value}


def depth_text(depth: int) -> str:
    return "[" * depth + "]" * depth


def register(api: httpx.Client, name: str, command: list[str], **extra: Any) -> None:
    response = api.post("/v1/functions", json={"name": name, "command": command, **extra})
    assert response.status_code in (200, 201), response.text


def run(api: httpx.Client, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = api.post(f"/v1/functions/{name}/invoke", params={"wait": 60}, json=body or {})
    assert response.status_code == 200, response.text
    return dict(response.json())


def listing_works(api: httpx.Client) -> None:
    response = api.get("/v1/executions", params={"limit": 500})
    assert response.status_code == 200, response.text


# JSON depth at the API


def test_args_at_the_depth_limit_are_accepted_and_read_back(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "deep-ok", ["/bin/true"])
        execution = run(api, "deep-ok", {"args": nested(MAX_JSON_DEPTH)})
        assert execution["state"] == "success"
        got = api.get(f"/v1/executions/{execution['id']}")
        assert got.status_code == 200 and got.json()["args"] == nested(MAX_JSON_DEPTH)
        listing_works(api)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 400])
def test_args_past_the_depth_limit_are_422_and_stored_nowhere(cluster: Cluster, depth: int) -> None:
    with cluster.client() as api:
        register(api, "deep-no", ["/bin/true"])
        response = api.post("/v1/functions/deep-no/invoke", json={"args": nested(depth)})
        assert response.status_code == 422, response.text
        error = error_of(response)
        assert error["code"] == "validation_error"
        assert f"deeper than {MAX_JSON_DEPTH}" in error["message"]
        assert error["details"][0]["loc"] == ["body", "args"]
        listed = api.get("/v1/executions", params={"function": "deep-no"})
        assert listed.status_code == 200 and listed.json()["items"] == []


def test_a_body_too_deep_to_parse_is_a_4xx(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "deep-parse", ["/bin/true"])
        body = '{"args": {"x": ' + depth_text(20_000) + "}}"
        response = api.post("/v1/functions/deep-parse/invoke", content=body)
        assert 400 <= response.status_code < 500, response.text
        error_of(response)
        listing_works(api)


# Results a program leaves on fd 3


def result_program(depth: int) -> list[str]:
    return [PYTHON, "-c", f"import os; os.write(3, b'{depth_text(depth)}' + b'\\n')"]


def test_a_result_at_the_depth_limit_is_kept(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "result-ok", result_program(MAX_JSON_DEPTH))
        execution = run(api, "result-ok")
        assert (execution["state"], execution["error"]) == ("success", None)
        assert json.dumps(execution["result"]) == depth_text(MAX_JSON_DEPTH)
        assert api.get(f"/v1/executions/{execution['id']}").status_code == 200
        listing_works(api)


def test_a_result_past_the_depth_limit_fails_the_execution_not_the_node(
    cluster: Cluster,
) -> None:
    with cluster.client() as api:
        for depth in (MAX_JSON_DEPTH + 1, 300):
            register(api, f"result-deep-{depth}", result_program(depth))
            execution = run(api, f"result-deep-{depth}")
            assert (execution["state"], execution["error"]) == ("failure", RESULT_INVALID)
            assert (execution["exit_code"], execution["result"]) == (0, None)
        listing_works(api)
        node = cluster.node_named("node0", connected=True)
        assert node is not None and node["state"] == "ready"
        register(api, "after-deep", ["/bin/echo", "still here"])
        assert run(api, "after-deep")["state"] == "success"


# Images


@pytest.mark.parametrize(
    "image",
    ["oci:1234/x", "oci:/srv/layout:v1", "docker://busybox", "dir:/srv", "../x", "a" * 256],
)
def test_images_that_are_not_registry_references_are_422(cluster: Cluster, image: str) -> None:
    with cluster.client() as api:
        response = api.post(
            "/v1/functions", json={"name": "img", "command": ["/bin/true"], "image": image}
        )
        assert response.status_code == 422, response.text
        assert "registry reference" in error_of(response)["message"]


def test_an_image_name_at_the_length_limit_is_accepted(cluster: Cluster) -> None:
    with cluster.client() as api:
        body = {"name": "img-long", "command": ["/bin/true"], "image": "a" * 255}
        assert api.post("/v1/functions", json=body).status_code == 201


# Request bodies


def raw_request(
    cluster: Cluster,
    chunks: list[bytes],
    key: str | None = None,
    length: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST /v1/functions with a body of `chunks` (chunked, or `length` bytes long said by
    Content-Length) that never ends: the answer must come without Weaver waiting for the
    rest."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    head = f"POST /v1/functions HTTP/1.1\r\nHost: x\r\n{auth}{framing}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if length is None:
                chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            sock.sendall(chunk)
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            assert data, f"closed without an answer: {received!r}"
            received += data
        header, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            data = sock.recv(65536)
            assert data, "closed in the middle of the answer"
            body += data
    return int(header.split(b" ")[1]), json.loads(body)


def test_a_chunked_body_past_the_limit_is_413_as_soon_as_it_passes(cluster: Cluster) -> None:
    chunks = [b" " * 8192] * (MAX_BODY // 8192) + [b" "]
    status, body = raw_request(cluster, chunks, cluster.admin_key)
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert body["error"]["details"] == {"limit": MAX_BODY}
    assert httpx.get(f"{cluster.url}/healthz").status_code == 200


def test_a_chunked_body_at_the_limit_is_read(cluster: Cluster) -> None:
    spec = json.dumps({"name": "chunked", "command": ["/bin/true"]}).encode()
    body = spec + b" " * (MAX_BODY - len(spec))
    with cluster.client() as api:
        response = api.post("/v1/functions", content=iter([body[:1000], body[1000:]]))
        assert response.status_code == 201, response.text


@pytest.mark.parametrize("key", [None, "tk_unknown"])
def test_an_unauthenticated_body_is_refused_before_it_is_read(
    cluster: Cluster, key: str | None
) -> None:
    # The body never ends: only a refusal that does not read it can answer.
    for length in (None, 10**12):
        status, body = raw_request(cluster, [b"{" * 4096], key, length)
        assert status == 401
        assert body["error"]["code"] == "unauthenticated"


def test_public_routes_need_no_key(cluster: Cluster) -> None:
    for path in ("/healthz", "/openapi.json", "/docs"):
        assert httpx.get(f"{cluster.url}{path}").status_code == 200, path


# Output


def test_output_past_the_cap_is_cut_with_a_marker(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "chatty", [PYTHON, "-c", "print('x' * 5000)"])
        execution = run(api, "chatty")
        assert (execution["state"], execution["output_truncated"]) == ("success", True)
        response = api.get(f"/v1/executions/{execution['id']}/output")
        assert response.headers["content-type"] == "application/json"
        output = response.json()
        assert set(output) == OUTPUT_KEYS
        assert output["stdout"] == "x" * MAX_OUTPUT + "\n" + output_marker(MAX_OUTPUT)
        assert output["complete"] is True


def test_output_within_the_cap_is_whole(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "quiet", [PYTHON, "-c", f"print('x' * {MAX_OUTPUT - 1})"])
        execution = run(api, "quiet")
        assert execution["output_truncated"] is False
        output = api.get(f"/v1/executions/{execution['id']}/output").json()
        assert output["stdout"] == "x" * (MAX_OUTPUT - 1) + "\n"


# Nodes that misbehave


class FakeNode:
    """A node played by hand over the real agent socket. It runs nothing: the test sends
    what the node would report. Its taint keeps other tests' work off it."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        cpu_millicores: int = 64_000,
        price_per_hour: float = 0.0,
        tag: str | None = None,
    ) -> None:
        # The same tag again (and the node's credential on the socket): the node reconnects.
        self.tag = tag or uuid.uuid4().hex[:12]
        self.ws = ws
        capacity = Resources(cpu_millicores=cpu_millicores, memory_mib=65_536, disk_mib=1_000_000)
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            name=f"fake-{self.tag}",
            capacity=capacity,
            runtimes=[Tier.PROCESS],
            labels={"fake": self.tag},
            taints={"fake": "yes"},
            price_per_hour=price_per_hour,
        )
        self.ws.send(encode(hello))
        welcome = self.receive(lambda m: isinstance(m, Welcome))
        assert isinstance(welcome, Welcome)
        self.welcome = welcome
        self.placement = {"labels": {"fake": self.tag}, "tolerations": ["fake"]}

    def send(self, frame: str) -> None:
        self.ws.send(frame)

    def receive(self, wanted: Callable[[WeaverMessage], bool]) -> WeaverMessage:
        while True:
            message = decode_from_weaver(self.ws.recv(timeout=30))
            if wanted(message):
                return message

    def assigned(self) -> AssignSpec:
        message = self.receive(lambda m: isinstance(m, Assign))
        assert isinstance(message, Assign)
        return message.spec


@pytest.fixture
def node(cluster: Cluster) -> Iterator[FakeNode]:
    url = cluster.url.replace("http", "ws") + "/v1/agent"
    headers = {"Authorization": f"Bearer {cluster.join_token}"}
    with ws_client.connect(url, additional_headers=headers) as ws:
        yield FakeNode(ws)


def start(api: httpx.Client, node: FakeNode, name: str, count: int) -> list[AssignSpec]:
    """`count` executions of a new function placed on `node`, reported started."""
    register(api, name, ["/bin/true"], placement=node.placement)
    ids = set()
    for _ in range(count):
        response = api.post(f"/v1/functions/{name}/invoke", json={})
        assert response.status_code == 202, response.text
        ids.add(response.json()["id"])
    specs = [node.assigned() for _ in range(count)]
    assert {spec.id for spec in specs} == ids
    for spec in specs:
        node.send(encode(Started(id=spec.id, attempt=spec.attempt)))
    return sorted(specs, key=lambda spec: spec.id)


def exited(spec: AssignSpec, chunks: int = 0, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "exited",
        "id": spec.id,
        "attempt": spec.attempt,
        "exit_code": 0,
        "reason": None,
        "result": None,
        "chunks": chunks,
        "usage": {"wall_ms": 1.0},
    }
    return {**frame, **fields}


def output(spec: AssignSpec, seq: int, data: str, stream: str = "stdout") -> str:
    chunk = Chunk(stream="stdout" if stream == "stdout" else "stderr", seq=seq, data=data)
    return encode(Output(id=spec.id, attempt=spec.attempt, chunks=[chunk]))


def finish(node: FakeNode, spec: AssignSpec) -> None:
    """The good neighbour: one chunk of output and a clean exit, sent right after the bad
    frame (so in the same batch, as often as not); both are acknowledged."""
    node.send(output(spec, 0, "fine\n"))
    node.send(json.dumps(exited(spec, chunks=1)))
    node.receive(lambda m: isinstance(m, Ack) and m.id == spec.id and m.exited)


def execution(api: httpx.Client, spec: AssignSpec) -> dict[str, Any]:
    return dict(api.get(f"/v1/executions/{spec.id}").json())


def ended(api: httpx.Client, spec: AssignSpec) -> dict[str, Any]:
    return eventually(
        lambda: (e := execution(api, spec))["state"] not in ("open", "running") and e,
        what=f"{spec.id} to end",
    )


BAD_FRAMES: dict[str, Callable[[AssignSpec], str]] = {
    "exit_code past int32": lambda s: json.dumps(exited(s, exit_code=2**70)),
    "NaN wall time": lambda s: json.dumps(exited(s, usage={"wall_ms": float("nan")})),
    "Infinity cpu time": lambda s: json.dumps(exited(s, usage={"cpu_ms": float("inf")})),
    "max_rss past int64": lambda s: json.dumps(exited(s, usage={"max_rss_kib": 2**70})),
    "chunk count past int32": lambda s: json.dumps(exited(s, chunks=2**40)),
    "chunk seq past int32": lambda s: json.dumps(
        {
            "type": "output",
            "id": s.id,
            "attempt": s.attempt,
            "chunks": [{"stream": "stdout", "seq": 2**70, "data": "x"}],
        }
    ),
    # json.dumps writes a lone surrogate as an escape, which JSON parsers refuse.
    "unpaired surrogate": lambda s: json.dumps(
        {
            "type": "output",
            "id": s.id,
            "attempt": s.attempt,
            "chunks": [{"stream": "stdout", "seq": 0, "data": "\ud800"}],
        }
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_FRAMES))
def test_a_bad_frame_fails_its_execution_alone_and_keeps_the_link(
    cluster: Cluster, node: FakeNode, bad: str
) -> None:
    with cluster.client() as api:
        victim, neighbour = start(api, node, f"bad-{uuid.uuid4().hex[:8]}", 2)
        node.send(BAD_FRAMES[bad](victim))
        finish(node, neighbour)
        failed = ended(api, victim)
        assert (failed["state"], failed["error"]) == ("failure", INVALID_REPORT)
        done = ended(api, neighbour)
        assert (done["state"], done["exit_code"]) == ("success", 0)
        got = api.get(f"/v1/executions/{neighbour.id}/output").json()
        assert (got["stdout"], got["complete"]) == ("fine\n", True)
        listing_works(api)
    assert cluster.node_named(f"fake-{node.tag}", connected=True)


def test_a_bad_output_frame_gets_its_process_killed(cluster: Cluster, node: FakeNode) -> None:
    with cluster.client() as api:
        (victim,) = start(api, node, "bad-output", 1)
        node.send(BAD_FRAMES["chunk seq past int32"](victim))
        cancel = node.receive(lambda m: isinstance(m, Cancel) and m.id == victim.id)
        assert isinstance(cancel, Cancel) and cancel.reason == INVALID_REPORT
        assert ended(api, victim)["error"] == INVALID_REPORT


def test_a_bad_exit_report_is_acknowledged_so_it_is_not_replayed(
    cluster: Cluster, node: FakeNode
) -> None:
    with cluster.client() as api:
        (victim,) = start(api, node, "bad-exit", 1)
        node.send(BAD_FRAMES["exit_code past int32"](victim))
        node.receive(lambda m: isinstance(m, Ack) and m.id == victim.id and m.exited)
        assert ended(api, victim)["error"] == INVALID_REPORT


@pytest.mark.parametrize(
    ("result", "state", "error"),
    [
        (nested(MAX_JSON_DEPTH), "success", None),
        (nested(MAX_JSON_DEPTH + 1), "failure", RESULT_INVALID),
        (nested(600), "failure", RESULT_INVALID),
    ],
)
def test_a_result_past_the_limit_from_a_node_is_dropped(
    cluster: Cluster, node: FakeNode, result: Any, state: str, error: str | None
) -> None:
    with cluster.client() as api:
        victim, neighbour = start(api, node, f"node-result-{uuid.uuid4().hex[:8]}", 2)
        node.send(json.dumps(exited(victim, exit_code=0, result=result)))
        finish(node, neighbour)
        got = ended(api, victim)
        assert (got["state"], got["error"], got["exit_code"]) == (state, error, 0)
        assert got["result"] == (result if state == "success" else None)
        assert ended(api, neighbour)["state"] == "success"
        listing_works(api)


def test_frames_that_name_no_valid_attempt_are_dropped(cluster: Cluster, node: FakeNode) -> None:
    with cluster.client() as api:
        (spec,) = start(api, node, "nameless", 1)
        for frame in (
            json.dumps(exited(spec, attempt=2**70)),
            json.dumps({"type": "heartbeat", "load": float("nan")}),
            "[" * 100_000,
            "not json",
            encode(
                Hello(protocol=PROTOCOL_VERSION, name="again", capacity=Resources(), runtimes=[])
            ),
        ):
            node.send(frame)
        finish(node, spec)
        assert ended(api, spec)["state"] == "success"


def test_weaver_enforces_the_output_cap_on_a_node_that_ignores_it(
    cluster: Cluster, node: FakeNode
) -> None:
    with cluster.client() as api:
        (spec,) = start(api, node, "overflow", 1)
        assert spec.max_output_bytes == MAX_OUTPUT  # the node was told
        for seq, piece in enumerate(["a" * 600, "b" * 600, "c" * 600]):
            node.send(output(spec, seq, piece))
        node.send(output(spec, 1, "b" * 600))  # a replay counts once
        node.send(json.dumps(exited(spec, chunks=3)))
        done = ended(api, spec)
        assert (done["state"], done["output_truncated"]) == ("success", True)
        got = api.get(f"/v1/executions/{spec.id}/output").json()
        assert got["stdout"] == "a" * 600 + "b" * 400 + "\n" + output_marker(MAX_OUTPUT)
        assert (got["complete"], got["next_seq"]) == (True, 2)


def test_an_attempt_given_back_and_placed_again_keeps_what_its_output_used(
    cluster: Cluster, node: FakeNode
) -> None:
    """A node that sent output for an attempt, then leaves it out of its hello (never
    started, it says), gets it back with the same attempt: its output budget is what the
    attempt already stored, not a fresh one."""
    with cluster.client() as api:
        register(api, "given-back", ["/bin/true"], placement=node.placement)
        invoked = api.post("/v1/functions/given-back/invoke", json={})
        assert invoked.status_code == 202, invoked.text
        spec = node.assigned()
        for seq, piece in enumerate(["a" * 600, "b" * 600]):  # the cap (1,000) reached
            node.send(output(spec, seq, piece))
        node.receive(lambda m: isinstance(m, Ack) and m.id == spec.id and m.seq == 1)
        welcome = node.welcome
        node.ws.close()
        url = cluster.url.replace("http", "ws") + "/v1/agent"
        credential = {"Authorization": f"Bearer {welcome.node_id}:{welcome.node_secret}"}
        with ws_client.connect(url, additional_headers=credential) as ws:
            again = FakeNode(ws, tag=node.tag)
            assert again.welcome.node_id == welcome.node_id
            placed = again.assigned()  # given back, placed again: the same attempt
            assert (placed.id, placed.attempt) == (spec.id, spec.attempt)
            again.send(output(placed, 2, "c" * 600))
            again.send(json.dumps(exited(placed, chunks=3)))
            assert ended(api, spec)["output_truncated"] is True
            got = api.get(f"/v1/executions/{spec.id}/output").json()
            assert got["stdout"] == "a" * 600 + "b" * 400 + "\n" + output_marker(MAX_OUTPUT)


def test_output_is_streamed_whole_across_batches_and_resumes(
    cluster: Cluster, node: FakeNode
) -> None:
    with cluster.client() as api:
        (spec,) = start(api, node, "many-chunks", 1)
        count = 400  # more chunks than one read takes, and under the cap
        node.send(
            encode(
                Output(
                    id=spec.id,
                    attempt=spec.attempt,
                    chunks=[
                        Chunk(stream="stdout" if seq % 3 else "stderr", seq=seq, data="é")
                        for seq in range(count)
                    ],
                )
            )
        )
        node.send(json.dumps(exited(spec, chunks=count)))
        ended(api, spec)
        got = api.get(f"/v1/executions/{spec.id}/output").json()
        stderr = (count + 2) // 3
        assert got == {
            "stdout": "é" * (count - stderr),
            "stderr": "é" * stderr,
            "attempt": 1,
            "complete": True,
            "next_seq": count,
        }
        rest = api.get(f"/v1/executions/{spec.id}/output", params={"after_seq": 299}).json()
        assert (len(rest["stdout"]) + len(rest["stderr"]), rest["next_seq"]) == (100, count)
        none = api.get(f"/v1/executions/{spec.id}/output", params={"after_seq": 500}).json()
        assert none == {
            "stdout": "",
            "stderr": "",
            "attempt": 1,
            "complete": True,
            "next_seq": 501,
        }
