"""The E2B surface against a hostile tenant: whatever it sends (bodies, headers, Connect
envelopes, multipart bodies, user names, selectors, signatures), another tenant's sandboxes
stay out of reach, nothing opens envd without the sandbox's access token, and bad input is a
clear 4xx in the shape of the route (E2B's `{"code", "message"}`, Connect's `{"code":
"<name>"}`), never a 5xx, a crash or a leak in Weaver, nor a lost node link."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.cluster import Cluster, eventually
from treadle.weaver.envd.gen.process import process_pb

pytestmark = pytest.mark.integration

UNARY = {"content-type": "application/json", "connect-protocol-version": "1"}
STREAM = {"content-type": "application/connect+json", "connect-protocol-version": "1"}
# The tenant's streams (exec, files, watches) open at once: TREADLE_MAX_EXEC_STREAMS_PER_TENANT.
STREAMS_PER_TENANT = 64


def envelope(message: dict[str, Any] | bytes, flags: int = 0) -> bytes:
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def envelopes(content: bytes) -> list[tuple[int, dict[str, Any]]]:
    """A Connect stream's messages: (flags, message)."""
    found, at = [], 0
    while at + 5 <= len(content):
        flags, size = struct.unpack(">BI", content[at : at + 5])
        if at + 5 + size > len(content):
            break  # the rest is still on its way
        found.append((flags, json.loads(content[at + 5 : at + 5 + size])))
        at += 5 + size
    return found


def stream_error(response: httpx.Response) -> dict[str, Any] | None:
    """The error a Connect stream ended with, if any."""
    assert response.status_code == 200, response.text
    flags, last = envelopes(response.content)[-1]
    assert flags == 2, response.content
    error: dict[str, Any] | None = last.get("error")
    return error


def signed(path: str, operation: str, user: str | None, token: str, expires: Any = None) -> str:
    raw = f"{path}:{operation}:{user or ''}:{token}" + ("" if expires is None else f":{expires}")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).decode().rstrip("=")


class Tenant:
    """A tenant of its own (so that its stream limit is its own), and its E2B sandboxes."""

    def __init__(self, cluster: Cluster, key: str | None = None) -> None:
        if key is None:
            with cluster.client() as admin:
                made = admin.post("/v1/tenants", json={"name": f"hostile-{uuid.uuid4().hex}"})
                assert made.status_code == 201, made.text
                key = str(made.json()["api_key"])
        self.key = key
        self.api = httpx.Client(base_url=cluster.url, timeout=60, headers={"X-API-Key": key})
        self.envd = httpx.Client(base_url=cluster.url, timeout=60)

    def create(self, **body: Any) -> tuple[str, dict[str, str]]:
        """A sandbox: its E2B id, and the headers that open its envd."""
        created = self.api.post("/v2/sandboxes", json={"templateID": "base", **body})
        assert created.status_code == 201, created.text
        answer = created.json()
        return answer["sandboxID"], {
            "e2b-sandbox-id": answer["sandboxID"],
            "x-access-token": answer["envdAccessToken"],
        }

    def rpc(self, method: str, body: Any, headers: dict[str, str]) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.envd.post(f"/{method}", content=content, headers={**UNARY, **headers})

    def start(self, request: Any, headers: dict[str, str], **extra: str) -> httpx.Response:
        content = request if isinstance(request, bytes) else envelope(request)
        return self.envd.post(
            "/process.Process/Start", content=content, headers={**STREAM, **headers, **extra}
        )

    def run(self, headers: dict[str, str], script: str, *argv: str) -> str:
        """`script`'s stdout, run in the sandbox by envd (with `argv`, by that program)."""
        cmd, *args = argv or ("/bin/sh", "-c")
        ran = self.start(
            {"process": {"cmd": cmd, "args": [*args, script]}, "stdin": False}, headers
        )
        assert stream_error(ran) is None, ran.content
        out = b"".join(
            base64.b64decode(m["event"]["data"].get("stdout", ""))
            for _, m in envelopes(ran.content)
            if "data" in m.get("event", {})
        )
        return out.decode()

    def close(self) -> None:
        self.api.close()
        self.envd.close()


@pytest.fixture(scope="module")
def admin(e2b_cluster: Cluster) -> Iterator[Tenant]:
    tenant = Tenant(e2b_cluster, e2b_cluster.admin_key)
    yield tenant
    tenant.close()


@pytest.fixture(scope="module")
def sandbox(admin: Tenant) -> Iterator[tuple[str, dict[str, str]]]:
    """One running sandbox for the tests that change nothing in it."""
    made = admin.create(timeout=600)
    yield made
    admin.api.delete(f"/sandboxes/{made[0]}")


@pytest.fixture
def tenant(e2b_cluster: Cluster) -> Iterator[Tenant]:
    fresh = Tenant(e2b_cluster)
    yield fresh
    for item in fresh.api.get("/v2/sandboxes").json():
        fresh.api.delete(f"/sandboxes/{item['sandboxID']}")
    fresh.close()


# envd: who may use it


def test_envd_opens_only_with_the_sandbox_s_token(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    sid, mine = sandbox
    other_sid, theirs = admin.create(timeout=120)
    refused = [
        {"e2b-sandbox-id": sid},
        {"e2b-sandbox-id": sid, "x-access-token": ""},
        {"e2b-sandbox-id": sid, "x-access-token": theirs["x-access-token"]},
        {"e2b-sandbox-id": sid, "x-access-token": "x" * 100_000},
        {"e2b-sandbox-id": sid.upper(), "x-access-token": mine["x-access-token"]},
        {"e2b-sandbox-id": f"sbx_sbx_{sid}", "x-access-token": mine["x-access-token"]},
        {"e2b-sandbox-id": "../../" + sid, "x-access-token": mine["x-access-token"]},
        {"e2b-sandbox-id": "a" * 5000, "x-access-token": mine["x-access-token"]},
        {"e2b-sandbox-id": "", "x-access-token": mine["x-access-token"]},
    ]
    for headers in refused:
        listed = admin.rpc("process.Process/List", {}, headers)
        assert listed.status_code == 401, (headers, listed.text)
        assert listed.json()["code"] == "unauthenticated"
        started = admin.start({"process": {"cmd": "/bin/true"}}, headers)
        assert stream_error(started) == {
            "code": "unauthenticated",
            "message": listed.json()["message"],
        }
        fetched = admin.envd.get("/files", params={"path": "/etc/hostname"}, headers=headers)
        assert fetched.status_code == 401 and fetched.json()["code"] == 401, fetched.text
    # The id as E2B gives it, and as treadle does.
    for named in (sid, f"sbx_{sid}"):
        listed = admin.rpc("process.Process/List", {}, {**mine, "e2b-sandbox-id": named})
        assert listed.status_code == 200, listed.text
    # A stopped sandbox's token does nothing there: a clear 4xx, never a 5xx.
    assert admin.api.delete(f"/sandboxes/{other_sid}").status_code == 204
    for method in ("process.Process/List", "filesystem.Filesystem/Stat"):
        after = admin.rpc(method, {"path": "/"}, theirs)
        assert after.status_code in (400, 401), after.text
        assert after.json()["code"] in ("failed_precondition", "unauthenticated")
    gone = admin.envd.get("/files", params={"path": "/etc/hostname"}, headers=theirs)
    assert gone.status_code in (400, 401), gone.text


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        ("Basic !!!", "invalid_argument"),
        ("Basic " + base64.b64encode(b"\xff\xfe:").decode(), "invalid_argument"),
        ("Basic " + base64.b64encode(b"a" * 1000 + b":").decode(), "invalid_argument"),
        ("Basic " + base64.b64encode(b"../../etc:").decode(), "invalid_argument"),
        ("Basic " + base64.b64encode(b"a b:").decode(), "invalid_argument"),
        ("Basic " + base64.b64encode(b"..:").decode(), "invalid_argument"),
    ],
)
def test_a_malformed_user_is_invalid_argument(
    admin: Tenant, sandbox: tuple[str, dict[str, str]], authorization: str, code: str
) -> None:
    _, headers = sandbox
    started = admin.start(
        {"process": {"cmd": "/usr/bin/id"}}, {**headers}, authorization=authorization
    )
    assert (stream_error(started) or {}).get("code") == code, started.content
    listed = admin.rpc("process.Process/List", {}, {**headers, "authorization": authorization})
    assert listed.status_code == 400 and listed.json()["code"] == code


def test_users_by_basic_auth_as_envd_reads_them(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    _, headers = sandbox

    def uid(user: bytes) -> str:
        basic = "Basic " + base64.b64encode(user).decode()
        return admin.run({**headers, "authorization": basic}, "id -u").strip()

    # The password is not looked at (envd's users have none); no colon is a user alone.
    assert uid(b"root:x") == uid(b"root") == uid(b"root:") == "0"
    assert uid(b"user:") == admin.run(headers, "id -u").strip() != "0"


# envd: Connect framing


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "unimplemented"),
        (b"\x00\x00\x00", "invalid_argument"),
        (struct.pack(">BI", 0, 1000) + b"{}", "invalid_argument"),
        (struct.pack(">BI", 0, 17 * 1024 * 1024) + b"{}", "resource_exhausted"),
        (struct.pack(">BI", 0xFF, 2) + b"{}", "invalid_argument"),
        (envelope({"process": {"cmd": "/bin/true"}}) * 2, "unimplemented"),
        (envelope(b"[1, 2]"), "invalid_argument"),
        (envelope(b"nul"), "invalid_argument"),
        (
            envelope(b'{"process": {"cmd": "x"}, "pty": {"size": {"rows": NaN}}}'),
            "invalid_argument",
        ),
        (
            envelope(b'{"process": {"cmd": "x"}, "pty": {"size": {"rows": 1e400}}}'),
            "invalid_argument",
        ),
        (envelope(b'{"process": {"cmd": "x"}, "pty": {"size": {"rows": -1}}}'), "invalid_argument"),
        (envelope(b'{"process": {"cmd": "/bin/\\ud800"}}'), "invalid_argument"),
        (envelope(b"[" * 100_000 + b"]" * 100_000), "invalid_argument"),
        (
            envelope(b'{"process": {"envs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}"),
            "invalid_argument",
        ),
        (envelope(b'{"x": ' + b"{" * 50_000 + b"}" * 50_000 + b"}"), "invalid_argument"),
    ],
)
def test_malformed_connect_streams_end_with_a_connect_error(
    admin: Tenant, sandbox: tuple[str, dict[str, str]], body: bytes, code: str
) -> None:
    _, headers = sandbox
    answer = admin.start(body, headers)
    assert (stream_error(answer) or {}).get("code") == code, answer.content[:300]
    # Weaver is still there, and serves the next call.
    assert admin.rpc("process.Process/List", {}, headers).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_argument"),
        (b"[]", 400, "invalid_argument"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_argument"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, 400, "invalid_argument"),
        (b'{"path": "/", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "invalid_argument"),
        (b'{"path": "/\xff"}', 400, "invalid_argument"),
        (b'{"path": 12}', 400, "invalid_argument"),
        (b'{"path": "/", "unknown": {"a": 1}}', 200, None),
    ],
)
def test_malformed_unary_calls_are_a_4xx_in_connect_s_shape(
    admin: Tenant, sandbox: tuple[str, dict[str, str]], body: bytes, status: int, code: str
) -> None:
    _, headers = sandbox
    answer = admin.rpc("filesystem.Filesystem/Stat", body, headers)
    assert answer.status_code == status, answer.text
    if code is not None:
        assert answer.json()["code"] == code
    assert admin.rpc("process.Process/List", {}, headers).status_code == 200


def test_nothing_is_read_or_parsed_without_the_token(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    """A caller without the token is refused before its message is parsed: deep nesting or
    not, it is the same 401."""
    sid, _ = sandbox
    for body in (b"{}", b"[" * 100_000 + b"]" * 100_000):
        answer = admin.rpc("filesystem.Filesystem/Stat", body, {"e2b-sandbox-id": sid})
        assert answer.status_code == 401 and answer.json()["code"] == "unauthenticated"


def test_content_types_and_timeouts_that_are_not_connect_s(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    _, headers = sandbox
    start = envelope({"process": {"cmd": "/bin/true"}})
    for content_type in ("text/plain", "application/json", "multipart/form-data"):
        answer = admin.envd.post(
            "/process.Process/Start",
            content=start,
            headers={**headers, "content-type": content_type},
        )
        assert answer.status_code == 415, answer.text
    for timeout in ("abc", "-5", "99999999999999999999"):
        answer = admin.start(start, headers, **{"connect-timeout-ms": timeout})
        assert answer.status_code == 400 and answer.json()["code"] == "invalid_argument"
    unknown = admin.rpc("filesystem.Filesystem/Nope", {}, headers)
    assert unknown.status_code == 404


# envd: processes


@pytest.mark.parametrize(
    ("process", "extra"),
    [
        ({"cmd": "/bin/echo", "args": ["a"] * 4096}, {}),
        ({"cmd": "/bin/echo", "args": ["x" * (128 * 1024 + 1)]}, {}),
        ({"cmd": "/bin/ec\u0000ho"}, {}),
        ({"cmd": "/bin/echo", "args": ["a\u0000b"]}, {}),
        ({"cmd": "/bin/echo", "envs": {f"K{i}": "v" for i in range(1025)}}, {}),
        ({"cmd": "/bin/echo", "envs": {"A=B": "x"}}, {}),
        ({"cmd": "/bin/echo", "envs": {"": "x"}}, {}),
        ({"cmd": "/bin/echo", "envs": {"A": "\u0000"}}, {}),
        ({"cmd": "/bin/pwd", "cwd": "/tmp\u0000x"}, {}),
        ({"cmd": "/bin/pwd", "cwd": "/" + "x" * 4096}, {}),
        ({"cmd": "/bin/echo"}, {"tag": "t" * 257}),
    ],
)
def test_start_refuses_what_treadle_s_exec_refuses(
    admin: Tenant,
    sandbox: tuple[str, dict[str, str]],
    process: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    _, headers = sandbox
    answer = admin.start({"process": process, "stdin": False, **extra}, headers)
    assert (stream_error(answer) or {}).get("code") == "invalid_argument", answer.content[:300]


def test_refused_starts_leave_no_stream_behind(tenant: Tenant) -> None:
    """More refused starts than the tenant may have streams open: none of them holds one."""
    _, headers = tenant.create(timeout=120, allow_internet_access=False)
    too_many = {"process": {"cmd": "/bin/echo", "args": ["a"] * 5000}, "stdin": False}
    for _ in range(STREAMS_PER_TENANT + 1):
        assert (stream_error(tenant.start(too_many, headers)) or {}).get(
            "code"
        ) == "invalid_argument"
    assert tenant.run(headers, "echo still") == "still\n"


def test_a_start_too_big_for_the_node_s_link_is_refused_and_the_link_stays(
    e2b_cluster: Cluster, admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    """16 MiB of binary protobuf that JSON would make six times larger: the frame to the
    node would be past what the node takes, and losing that link would cut every tenant's
    streams on the node."""
    _, headers = sandbox
    request = process_pb.StartRequest(
        process=process_pb.ProcessConfig(cmd="/bin/true", args=["\x01" * 131_072] * 127),
        stdin=False,
    ).to_binary()
    answer = admin.start(
        envelope(request), headers, **{"content-type": "application/connect+proto"}
    )
    assert answer.status_code == 200
    assert b'"invalid_argument"' in answer.content, answer.content[:300]
    assert e2b_cluster.node_named("ns0", connected=True) is not None
    assert admin.run(headers, "echo alive") == "alive\n"


def test_selectors_and_signals_reach_only_the_caller_s_processes(tenant: Tenant) -> None:
    _, headers = tenant.create(timeout=120, allow_internet_access=False)
    _, theirs = tenant.create(timeout=120, allow_internet_access=False)
    admin = tenant
    # A process in the other sandbox, left running by a stream that is closed at once.
    sleeper = {
        "process": {"cmd": "/bin/sleep", "args": ["300"]},
        "tag": "sleeper",
        "stdin": True,
    }
    with admin.envd.stream(
        "POST", "/process.Process/Start", content=envelope(sleeper), headers={**STREAM, **theirs}
    ) as opened:
        first = next(opened.iter_bytes())
    pid = envelopes(first)[0][1]["event"]["start"]["pid"]

    def signal(selector: dict[str, Any], signal: Any, on: dict[str, str]) -> httpx.Response:
        return admin.rpc("process.Process/SendSignal", {"process": selector, "signal": signal}, on)

    for selector, status in (
        ({"pid": 0}, 404),
        ({"pid": 2**32 - 1}, 404),
        ({"pid": 2**31}, 404),
        ({"pid": -1}, 400),
        ({"pid": 2**32}, 400),
        ({"tag": ""}, 400),
        ({"tag": "t" * 257}, 400),
        ({}, 400),
        ({"tag": "sleeper"}, 404),  # the other sandbox's tag is not known here
    ):
        answer = signal(selector, "SIGNAL_SIGKILL", headers)
        assert answer.status_code == status, (selector, answer.text)
        fed = admin.rpc("process.Process/SendInput", {"process": selector, "input": {}}, headers)
        assert fed.status_code == status, (selector, fed.text)
    # Its pid, here, names this sandbox's own processes (if any): never the other's.
    signal({"pid": pid}, "SIGNAL_SIGKILL", headers)
    for number in ("SIGNAL_UNSPECIFIED", 2, 19, 999, -1):
        answer = signal({"pid": pid}, number, theirs)
        assert answer.status_code == 400 and answer.json()["code"] == "invalid_argument"
    listed = admin.rpc("process.Process/List", {}, theirs).json()["processes"]
    assert [(p["pid"], p.get("tag")) for p in listed] == [(pid, "sleeper")]
    assert signal({"tag": "sleeper"}, "SIGNAL_SIGKILL", theirs).status_code == 200


def test_pty_sizes_out_of_range_are_clamped(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    _, headers = sandbox
    for rows, cols in ((0, 0), (2**32 - 1, 2**32 - 1)):
        answer = admin.start(
            {
                "process": {"cmd": "/bin/sh", "args": ["-c", "stty size"]},
                "pty": {"size": {"rows": rows, "cols": cols}},
                "stdin": False,
            },
            headers,
        )
        assert stream_error(answer) is None, answer.content
        output = b"".join(
            base64.b64decode(m["event"]["data"]["pty"])
            for _, m in envelopes(answer.content)
            if "data" in m.get("event", {})
        )
        assert output.split() == ([b"1", b"1"] if rows == 0 else [b"1000", b"1000"])


# envd: watchers


def test_watchers_are_the_sandbox_s_own_and_the_tenant_s_streams_bound_them(
    tenant: Tenant,
) -> None:
    sid, mine = tenant.create(timeout=120, allow_internet_access=False)
    _, theirs = tenant.create(timeout=120, allow_internet_access=False)
    made = [
        tenant.rpc("filesystem.Filesystem/CreateWatcher", {"path": "/home/user"}, mine)
        for _ in range(STREAMS_PER_TENANT)
    ]
    assert [m.status_code for m in made] == [200] * STREAMS_PER_TENANT
    ids = [m.json()["watcherId"] for m in made]
    # Past the sandbox's watchers, or the tenant's streams: told so, never a 5xx.
    more = tenant.rpc("filesystem.Filesystem/CreateWatcher", {"path": "/home/user"}, mine)
    assert more.status_code == 429 and more.json()["code"] == "resource_exhausted"
    for method, body in (
        ("filesystem.Filesystem/CreateWatcher", {"path": "/home/user"}),
        ("filesystem.Filesystem/Stat", {"path": "/"}),
        ("process.Process/List", {}),
    ):
        answer = tenant.rpc(method, body, theirs)
        assert answer.status_code == 429, (method, answer.text)
        assert answer.json()["code"] == "resource_exhausted"
    started = tenant.start({"process": {"cmd": "/bin/true"}}, theirs)
    assert (stream_error(started) or {}).get("code") == "resource_exhausted"
    fetched = tenant.envd.get("/files", params={"path": "/etc/hostname"}, headers=theirs)
    assert fetched.status_code == 429 and fetched.json()["code"] == 429
    # Another sandbox's watcher is not found from here, and stays.
    for method in ("GetWatcherEvents", "RemoveWatcher"):
        answer = tenant.rpc(f"filesystem.Filesystem/{method}", {"watcherId": ids[0]}, theirs)
        assert answer.status_code == 404 and answer.json()["code"] == "not_found"
    polled = tenant.rpc("filesystem.Filesystem/GetWatcherEvents", {"watcherId": ids[0]}, mine)
    assert polled.status_code == 200, polled.text
    for watcher_id in ids:
        removed = tenant.rpc("filesystem.Filesystem/RemoveWatcher", {"watcherId": watcher_id}, mine)
        assert removed.status_code == 200
    assert tenant.rpc("filesystem.Filesystem/Stat", {"path": "/"}, theirs).status_code == 200
    tenant.api.delete(f"/sandboxes/{sid}")


def test_watchers_of_a_killed_sandbox_are_forgotten_unasked(
    e2b_cluster: Cluster, tenant: Tenant
) -> None:
    """What a watcher holds is let go once its sandbox is gone, not kept until a client that
    will not come back asks for it."""
    sid, headers = tenant.create(timeout=120, allow_internet_access=False)
    ids = [
        tenant.rpc("filesystem.Filesystem/CreateWatcher", {"path": "/home/user"}, headers).json()[
            "watcherId"
        ]
        for _ in range(3)
    ]
    assert tenant.api.delete(f"/sandboxes/{sid}").status_code == 204
    with e2b_cluster.client(tenant.key) as api:
        # The node ends the watches before it reports the sandbox stopped.
        eventually(
            lambda: api.get(f"/v1/sandboxes/sbx_{sid}").json()["status"] == "stopped",
            what="the sandbox to stop",
        )
    for watcher_id in ids:
        polled = tenant.rpc(
            "filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher_id}, headers
        )
        assert polled.status_code == 404, polled.text
        # Forgotten already, not found ended now.
        assert polled.json()["message"] == f"watcher {watcher_id} not found"


def test_a_watcher_holds_its_newest_events_within_bounds(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    """More changes than a watcher holds while nobody asks: the newest are kept, at most
    10,000 of them and 1 MiB of names."""
    _, headers = sandbox
    for name, count, width in (("many", 10_050, 8), ("long", 5_000, 200)):
        admin.run(headers, f"mkdir -p {name}")
        made = admin.rpc("filesystem.Filesystem/CreateWatcher", {"path": name}, headers)
        watcher_id = made.json()["watcherId"]
        script = (
            f"for i in range({count}): open(f'{name}/{{i:0{width}d}}', 'w').close()\n"
            f"open('{name}/last', 'w').close()\n"
        )
        # A streamed watch of the same directory says when the last change has come.
        with admin.envd.stream(
            "POST",
            "/filesystem.Filesystem/WatchDir",
            content=envelope({"path": name}),
            headers={**STREAM, **headers},
        ) as watch:
            chunks = watch.iter_bytes()
            first = envelopes(next(chunks))
            assert "start" in first[0][1], first
            admin.run(headers, script, "python3", "-c")
            seen = b""
            for chunk in chunks:
                seen += chunk
                if b'"name":"last"' in seen:
                    break
        batches: list[list[str]] = []

        def poll(watcher_id: str = watcher_id, batches: list[list[str]] = batches) -> bool:
            answer = admin.rpc(
                "filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher_id}, headers
            )
            assert answer.status_code == 200, answer.text
            batches.append([e["name"] for e in answer.json().get("events", [])])
            return "last" in batches[-1]

        eventually(poll, what=f"the watcher of {name} to see its last change")
        for names in batches:
            assert len(names) <= 10_000
            assert sum(len(n) + 64 for n in names) <= 1024 * 1024
        # The oldest went first.
        assert f"{0:0{width}d}" not in [n for names in batches for n in names]
        admin.rpc("filesystem.Filesystem/RemoveWatcher", {"watcherId": watcher_id}, headers)
    admin.run(headers, "rm -rf many long")


# envd: /files


def test_signed_urls_open_one_path_user_and_operation_until_they_expire(
    admin: Tenant, sandbox: tuple[str, dict[str, str]]
) -> None:
    sid, headers = sandbox
    token = headers["x-access-token"]
    _, theirs = admin.create(timeout=120)
    written = admin.envd.post(
        "/files",
        params={"path": "signed.txt"},
        content=b"secret",
        headers={**headers, "content-type": "application/octet-stream"},
    )
    assert written.status_code == 200, written.text
    only = {"e2b-sandbox-id": sid}
    now = int(time.time())

    def get(params: dict[str, Any], named: dict[str, str] = only) -> httpx.Response:
        return admin.envd.get("/files", params={"path": "signed.txt", **params}, headers=named)

    good = get({"signature": signed("signed.txt", "read", None, token)})
    assert (good.status_code, good.content) == (200, b"secret")
    later = now + 600
    assert (
        get(
            {
                "signature": signed("signed.txt", "read", None, token, later),
                "signature_expiration": later,
            }
        ).status_code
        == 200
    )
    for params, status in (
        ({"signature": signed("other.txt", "read", None, token)}, 401),
        ({"signature": signed("signed.txt", "write", None, token)}, 401),
        ({"signature": signed("signed.txt", "read", None, token), "username": "root"}, 401),
        ({"signature": signed("signed.txt", "read", None, theirs["x-access-token"])}, 401),
        ({"signature": signed("signed.txt", "read", None, token, later)}, 401),
        (
            {
                "signature": signed("signed.txt", "read", None, token, now - 10),
                "signature_expiration": now - 10,
            },
            401,
        ),
        ({"signature": "v1_é"}, 401),
        (
            {"signature": signed("signed.txt", "read", None, token), "signature_expiration": "abc"},
            400,
        ),
        (
            {"signature": signed("signed.txt", "read", None, token), "signature_expiration": "-5"},
            400,
        ),
        (
            {"signature": signed("signed.txt", "read", None, token), "signature_expiration": "²"},
            400,
        ),
        (
            {
                "signature": signed("signed.txt", "read", None, token),
                "signature_expiration": "9" * 5000,
            },
            400,
        ),
    ):
        answer = get(params)
        assert answer.status_code == status, (params, answer.text)
        assert answer.json()["code"] == status
    # Signed for this sandbox, shown to another: nothing.
    elsewhere = get(
        {"signature": signed("signed.txt", "read", None, token)},
        {"e2b-sandbox-id": theirs["e2b-sandbox-id"]},
    )
    assert elsewhere.status_code == 401
    # Without E2b-Sandbox-Id it is not envd's at all.
    unrouted = get({"signature": signed("signed.txt", "read", None, token)}, {})
    assert unrouted.status_code == 404 and b"secret" not in unrouted.content
    # A signed upload, then the same signature used to read: refused.
    upload = signed("up.txt", "write", None, token)
    wrote = admin.envd.post(
        "/files",
        params={"path": "up.txt", "signature": upload},
        content=b"x",
        headers={**only, "content-type": "application/octet-stream"},
    )
    assert wrote.status_code == 200, wrote.text
    read_back = admin.envd.get(
        "/files", params={"path": "up.txt", "signature": upload}, headers=only
    )
    assert read_back.status_code == 401


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "XyZ") -> bytes:
    body = b""
    for name, filename, data in parts:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


def test_uploads_stay_in_the_sandbox_and_bad_ones_are_4xx(
    e2b_cluster: Cluster, admin: Tenant, sandbox: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    _, headers = sandbox
    multipart = {**headers, "content-type": "multipart/form-data; boundary=XyZ"}

    def upload(body: bytes, head: dict[str, str] = multipart, **params: str) -> httpx.Response:
        return admin.envd.post("/files", params=params, content=body, headers=head)

    # Paths outside the home, by `..` or absolute: the sandbox's own, never Weaver's or the
    # node's (the test's own directory stands for those).
    outside = tmp_path / "escaped.txt"
    for filename in ("../../../../.." + str(outside), str(outside)):
        answer = upload(_multipart([("file", filename, b"x")]))
        assert answer.status_code in (200, 403), answer.text
        assert not outside.exists()
        if answer.status_code == 200:
            inside = admin.rpc("filesystem.Filesystem/Stat", {"path": str(outside)}, headers)
            assert inside.status_code == 200 and inside.json()["entry"]["size"] == "1"

    cases = [
        (_multipart([("file", f"many/{i}", b"") for i in range(1001)]), multipart, 400),
        (_multipart([("other", "a.txt", b"x")]), multipart, 400),
        (_multipart([("file", "", b"x")]), multipart, 400),
        (b"abc", {**headers, "content-type": "multipart/form-data"}, 400),
        (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="u"\r\n\r\nab',
            multipart,
            400,
        ),
        (b"--XyZ\r\n" + b"X-Junk: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\n", multipart, 400),
    ]
    for body, head, status in cases:
        answer = upload(body, head)
        assert answer.status_code == status, answer.text
        assert answer.json()["code"] == status
    octet = {**headers, "content-type": "application/octet-stream"}
    assert upload(b"x", octet).status_code == 400  # no path
    assert upload(b"x", octet, path="/home/user").status_code == 400  # a directory
    assert upload(_multipart([("file", f"many/{i}", b"") for i in range(1000)])).status_code == 200
    for path, status in (("/home/user", 400), ("/no/such/file", 404), ("", 400)):
        answer = admin.envd.get("/files", params={"path": path}, headers=headers)
        assert answer.status_code == status, answer.text
        assert answer.json()["code"] == status
    for method in ("PUT", "DELETE"):
        assert (
            admin.envd.request(method, "/files", params={"path": "x"}, headers=headers).status_code
            == 405
        )
    admin.run(headers, "rm -rf many")


def test_a_multipart_body_broken_inside_a_part_leaves_no_stream_behind(tenant: Tenant) -> None:
    _, headers = tenant.create(timeout=120, allow_internet_access=False)
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
    # The part is open (its first megabyte is on its way) when the body turns bad.
    broken = head + b"x" * (1024 * 1024) + b"\r\n--B\r\nX-Junk: " + b"a" * (2 * 1024 * 1024)
    for _ in range(STREAMS_PER_TENANT + 1):
        answer = tenant.envd.post(
            "/files",
            content=broken,
            headers={**headers, "content-type": "multipart/form-data; boundary=B"},
        )
        assert answer.status_code == 400, answer.text
    assert tenant.run(headers, "echo still") == "still\n"


def test_an_upload_past_the_disk_is_507(e2b_cluster: Cluster) -> None:
    with e2b_cluster.client() as api:
        made = api.post(
            "/v1/sandboxes",
            json={"resources": {"disk_mib": 1}, "network": False, "home": "/home/user"},
        )
        assert made.status_code == 201, made.text
        row = made.json()
        headers = {"e2b-sandbox-id": row["id"], "x-access-token": row["access_token"]}
        with httpx.Client(base_url=e2b_cluster.url, timeout=60) as envd:
            octet = envd.post(
                "/files",
                params={"path": "big.bin"},
                content=b"x" * (2 * 1024 * 1024),
                headers={**headers, "content-type": "application/octet-stream"},
            )
            assert octet.status_code == 507 and octet.json()["code"] == 507, octet.text
            parted = envd.post(
                "/files",
                content=_multipart([("file", "big2.bin", b"x" * (2 * 1024 * 1024))], "B"),
                headers={**headers, "content-type": "multipart/form-data; boundary=B"},
            )
            assert parted.status_code == 507 and parted.json()["code"] == 507, parted.text
        api.delete(f"/v1/sandboxes/{row['id']}")


# control plane


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(63)}}, 201),
        ({"metadata": {f"k{i}": "v" for i in range(64)}}, 400),
        ({"metadata": {"k": "v" * 512}}, 201),
        ({"metadata": {"k": "v" * 513}}, 400),
        ({"metadata": {"k" * 64: "v"}}, 201),
        ({"metadata": {"k" * 65: "v"}}, 400),
        ({"metadata": ["k"]}, 400),
        ({"envVars": {f"K{i}": "v" for i in range(1024)}}, 201),
        ({"envVars": {f"K{i}": "v" for i in range(1025)}}, 400),
        ({"envVars": {"A": "a\u0000b"}}, 400),
        ({"timeout": 1}, 201),
        ({"timeout": 604_800}, 201),
        ({"timeout": 0}, 400),
        ({"timeout": -1}, 400),
        ({"timeout": 604_801}, 400),
        ({"timeout": 10**30}, 400),
        ({"timeout": 1.5}, 400),
        ({"timeout": "soon"}, 400),
        ({"timeout": True}, 400),
        ({"timeout": "30"}, 400),
        ({"timeout": [60]}, 400),
        ({"network": {}}, 201),
        ({"network": {"allowPublicTraffic": False}}, 201),
        ({"network": {"allowPublicTraffic": None}}, 400),
        ({"network": {"allowPublicTraffic": 1}}, 400),
        ({"network": []}, 400),
        ({"network": "none"}, 400),
        ({"network": {"allowOut": []}}, 400),
        ({"network": {"denyOut": ["0.0.0.0/0"]}}, 400),
        ({"templateID": 1}, 400),
        ({"autoResume": [1]}, 400),
        ({"mcp": {"x": 1}}, 400),
    ],
)
def test_create_at_and_past_each_limit(admin: Tenant, body: dict[str, Any], status: int) -> None:
    created = admin.api.post(
        "/v2/sandboxes", json={"templateID": "base", "allow_internet_access": False, **body}
    )
    assert created.status_code == status, created.text
    if status == 201:
        admin.api.delete(f"/sandboxes/{created.json()['sandboxID']}")
    else:
        assert created.json()["code"] == 400 and created.json()["message"]


def test_bodies_nobody_would_send_are_4xx(admin: Tenant) -> None:
    deep = b'{"templateID": "base", "mcp": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for content, status in ((deep, 400), (b"[1]", 400), (b"{", 400)):
        answer = admin.api.post(
            "/v2/sandboxes", content=content, headers={"content-type": "application/json"}
        )
        assert answer.status_code == status, answer.text
    huge = b'{"templateID": "base", "x": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    answer = admin.api.post(
        "/v2/sandboxes", content=huge, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413


def test_another_tenant_s_sandbox_is_404_on_every_route(
    admin: Tenant, sandbox: tuple[str, dict[str, str]], tenant: Tenant
) -> None:
    sid, _ = sandbox
    routes = [
        ("GET", "/sandboxes/{}", None),
        ("GET", "/sandboxes/{}/metrics", None),
        ("DELETE", "/sandboxes/{}", None),
        ("POST", "/sandboxes/{}/timeout", {"timeout": 10}),
        ("POST", "/sandboxes/{}/refreshes", {"duration": 10}),
        ("POST", "/sandboxes/{}/pause", {}),
        ("POST", "/sandboxes/{}/resume", {}),
        ("POST", "/sandboxes/{}/connect", {"timeout": 10}),
        ("POST", "/v2/sandboxes/{}/connect", {"timeout": 10}),
    ]
    for named in (sid, f"sbx_{sid}"):
        for method, path, body in routes:
            theirs = tenant.api.request(method, path.format(named), json=body)
            missing = tenant.api.request(
                method, path.format("01m9zzzzzzzzzzzzzzzzzzzzzz"), json=body
            )
            assert theirs.status_code == missing.status_code == 404, (method, path, theirs.text)
            assert theirs.json()["message"] == f"sandbox {named!r} not found"
    assert sid not in tenant.api.get("/v2/sandboxes").text
    assert sid not in tenant.api.get("/sandboxes").text
    # Untouched by all of that.
    info = admin.api.get(f"/sandboxes/{sid}").json()
    assert info["state"] == "running"


def test_paging_tokens_page_only_the_caller_s_own(admin: Tenant, tenant: Tenant) -> None:
    made = [admin.create(timeout=120, allow_internet_access=False)[0] for _ in range(2)]
    page = admin.api.get("/v2/sandboxes", params={"limit": 1})
    token = page.headers["x-next-token"]
    theirs = tenant.api.get("/v2/sandboxes", params={"nextToken": token})
    assert theirs.status_code == 200 and theirs.json() == []
    for forged, status in (
        (base64.urlsafe_b64encode(b"sbx_" + b"z" * 30).decode(), 200),
        (base64.urlsafe_b64encode(b"sbx_' OR 1=1 --").decode(), 200),
        (base64.urlsafe_b64encode(b"sbx_\xff\xfe").decode(), 400),
        (base64.urlsafe_b64encode(b"exe_1").decode(), 400),
        ("a" * 513, 400),
        ("!!", 400),
    ):
        answer = tenant.api.get("/v2/sandboxes", params={"nextToken": forged})
        assert answer.status_code == status, (forged, answer.text)
        if status == 200:
            assert answer.json() == []
    for sandbox_id in made:
        admin.api.delete(f"/sandboxes/{sandbox_id}")


# ports


def test_a_port_tells_nobody_without_a_credential_whether_its_sandbox_exists(
    admin: Tenant, tenant: Tenant
) -> None:
    private, _ = admin.create(timeout=120, network={"allowPublicTraffic": False})
    public, _ = admin.create(timeout=120)
    killed, _ = admin.create(timeout=120)
    assert admin.api.delete(f"/sandboxes/{killed}").status_code == 204
    anyone = admin.envd
    missing = "01m9zzzzzzzzzzzzzzzzzzzzzz"

    def port(sandbox_id: str, **options: Any) -> httpx.Response:
        return anyone.get(f"/v1/sandboxes/sbx_{sandbox_id}/ports/8000/", **options)

    # Nothing listens on the public one's port: it is reached, and says so.
    assert port(public).status_code == 502
    credentials: list[tuple[Any, int]] = [
        (lambda _: {}, 401),
        (lambda _: {"headers": {"e2b-traffic-access-token": "wrong"}}, 403),
        (lambda _: {"headers": {"x-treadle-access-token": "wrong"}}, 403),
        (lambda _: {"params": {"treadle_expires": "9" * 5000, "treadle_signature": "x"}}, 403),
        (lambda _: {"params": {"treadle_expires": "²", "treadle_signature": "x"}}, 403),
        (
            lambda sid: {"headers": {"cookie": f"treadle_port_sbx_{sid}_8000={'9' * 5000}.ab"}},
            403,
        ),
        (lambda _: {"headers": {"authorization": f"Bearer {tenant.key}"}}, 404),
    ]
    for credential, status in credentials:
        answers = {name: port(name, **credential(name)) for name in (private, killed, missing)}
        statuses = {name: a.status_code for name, a in answers.items()}
        assert set(statuses.values()) == {status}, (status, statuses)
        messages = {a.json()["error"]["message"].replace(k, "") for k, a in answers.items()}
        assert len(messages) == 1, messages
    for sandbox_id in (private, public):
        admin.api.delete(f"/sandboxes/{sandbox_id}")


def test_a_body_past_the_limit_is_413_in_e2b_s_shape(raw: httpx.Client) -> None:
    huge = b'{"templateID": "base", "metadata": {"a": "' + b"x" * (9 * 1024 * 1024) + b'"}}'
    for headers in ({"content-type": "application/json"}, {"transfer-encoding": "chunked"}):
        answer = raw.post(
            "/v2/sandboxes",
            content=huge if "content-type" in headers else iter([huge]),
            headers=headers,
        )
        assert answer.status_code == 413, answer.text
        assert set(answer.json()) == {"code", "message"} and answer.json()["code"] == 413
