"""Sandboxes end to end through the API: a real Weaver and real Shuttles over loopback."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from support.cluster import Cluster, eventually
from support.sandboxes import create, run, start, status_of

pytestmark = pytest.mark.integration


def reaches(api: httpx.Client, sandbox_id: str, status: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        seen = status_of(api, sandbox_id)
        return seen if seen["status"] == status else None

    return eventually(check, what=f"sandbox {sandbox_id} to be {status}")


def test_an_agent_session_create_run_pause_resume_stop(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api, metadata={"agent": "a1"}, env={"GREETING": "hello"})
        assert (sandbox["status"], sandbox["desired"]) == ("pending", "running")
        # An exec waits for a sandbox that is starting.
        first = run(api, sandbox["id"], "echo $GREETING; echo oops >&2; exit 3")
        assert (first["stdout"], first["stderr"], first["exit_code"]) == ("hello\n", "oops\n", 3)
        running = status_of(api, sandbox["id"])
        assert running["status"] == "running" and running["node_id"] is not None

        # One machine: what one command leaves, the next sees.
        run(api, sandbox["id"], ["sh", "-c", "echo kept > note.txt"])
        assert run(api, sandbox["id"], ["cat", "note.txt"])["stdout"] == "kept\n"
        assert run(api, sandbox["id"], ["wc", "-c"], stdin="x" * 100_000)["stdout"].strip() == (
            "100000"
        )

        # The process tier has no boundary to freeze.
        unpausable = api.post(f"/v1/sandboxes/{sandbox['id']}/pause")
        assert unpausable.status_code == 409, unpausable.text
        assert "cannot be paused" in unpausable.text

        listed = api.get("/v1/sandboxes", params={"metadata": "agent:a1"}).json()
        assert [item["id"] for item in listed["items"]] == [sandbox["id"]]
        assert api.get("/v1/sandboxes", params={"metadata": "agent:other"}).json()["items"] == []

        assert api.delete(f"/v1/sandboxes/{sandbox['id']}").status_code == 200
        stopped = reaches(api, sandbox["id"], "stopped")
        assert stopped["ended_at"] is not None
        after = api.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"cmd": "true"})
        assert after.status_code == 409
        assert api.post(f"/v1/sandboxes/{sandbox['id']}/resume").status_code == 409

        # What it held on its node is free again.
        node = cluster.node_named("node0")
        assert node is not None
        eventually(
            lambda: (
                api.get(f"/v1/nodes/{node['id']}").json()["allocated"]["cpu_millicores"] == 0
                or None
            ),
            what="the node's allocation to be released",
        )


def test_a_sandbox_stops_when_its_ttl_runs_out(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api, timeout_s=1)
        stopped = reaches(api, sandbox["id"], "stopped")
        assert stopped["end_reason"] == "timeout"


def test_a_refreshed_ttl_counts_from_the_refresh(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api, timeout_s=600)
        response = api.post(f"/v1/sandboxes/{sandbox['id']}/timeout", json={"timeout_s": 3600})
        assert response.status_code == 200
        assert response.json()["expires_at"] > sandbox["expires_at"]
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"timeout_s": -1}, "timeout_s"),
        ({"timeout_s": 8 * 24 * 3600}, "timeout_s"),
        ({"image": "not a reference!"}, "image"),
        ({"env": {"TREADLE_X": "1"}}, "env"),
        ({"metadata": {"": "x"}}, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "metadata"),
        ({"restart": "sometimes"}, "restart"),
        ({"resources": {"cpu_millicores": 0}}, "resources"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_bad_sandboxes_are_refused_naming_the_field(
    cluster: Cluster, body: dict[str, Any], field: str
) -> None:
    with cluster.client() as api:
        response = api.post("/v1/sandboxes", json=body)
    assert response.status_code == 422, response.text
    assert field in response.text


def test_exec_input_is_checked(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        for body in ({"cmd": []}, {"cmd": [""]}, {"cmd": "a\x00b"}, {"cmd": "x", "timeout_s": 0}):
            response = api.post(f"/v1/sandboxes/{sandbox['id']}/exec", json=body)
            assert response.status_code == 422, (body, response.text)
        assert api.post("/v1/sandboxes/sbx_nope/exec", json={"cmd": "true"}).status_code == 404
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_another_tenant_sees_nothing(cluster: Cluster) -> None:
    with cluster.client() as admin:
        sandbox = create(admin)
        created = admin.post("/v1/tenants", json={"name": "other-sbx"})
        assert created.status_code == 201, created.text
        key = created.json()["api_key"]
    with cluster.client(key) as other:
        assert other.get(f"/v1/sandboxes/{sandbox['id']}").status_code == 404
        assert other.delete(f"/v1/sandboxes/{sandbox['id']}").status_code == 404
        refused = other.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"cmd": "true"})
        assert refused.status_code == 404
        assert other.get("/v1/sandboxes").json()["items"] == []
        # Not allowed the process tier: asking for it by name is refused.
        assert other.post("/v1/sandboxes", json={"isolation": "process"}).status_code == 422
    with cluster.client() as admin:
        admin.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_a_namespace_sandbox_runs_as_its_own_unprivileged_user(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle("ns0", "--runtime", "namespace")
        with cluster.client() as api:
            sandbox = create(api)
            result = run(api, sandbox["id"], ["sh", "-c", "id -u; cat /proc/self/status"])
            lines = result["stdout"].splitlines()
            assert lines[0] == "1000"
            assert status_of(api, sandbox["id"])["isolation"] == "namespace"
            fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            assert int(fields["CapEff"], 16) == 0

            run(api, sandbox["id"], "echo kept > note.txt")
            assert api.post(f"/v1/sandboxes/{sandbox['id']}/pause").status_code == 200
            paused = reaches(api, sandbox["id"], "paused")
            assert paused["desired"] == "paused"
            refused = api.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"cmd": "true"})
            assert refused.status_code == 409, refused.text
            assert api.post(f"/v1/sandboxes/{sandbox['id']}/resume").status_code == 200
            reaches(api, sandbox["id"], "running")
            assert run(api, sandbox["id"], ["cat", "note.txt"])["stdout"] == "kept\n"
            api.delete(f"/v1/sandboxes/{sandbox['id']}")
            reaches(api, sandbox["id"], "stopped")
    finally:
        cluster.stop()


def test_a_lost_node_s_sandbox_comes_back_on_another_node(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(node_down_after_s="1", node_startup_grace_s="0")
        first = cluster.start_shuttle("a")
        with cluster.client() as api:
            sandbox = create(api, restart="on_failure")
            run(api, sandbox["id"], "echo before > note.txt")
            placed = status_of(api, sandbox["id"])
            node_a = cluster.node_named("a")
            assert node_a is not None and placed["node_id"] == node_a["id"]

            cluster.start_shuttle("b")
            first.stop(signal.SIGKILL)

            def on_b() -> dict[str, Any] | None:
                seen = status_of(api, sandbox["id"])
                moved = seen["status"] == "running" and seen["node_id"] != node_a["id"]
                return seen if moved else None

            moved = eventually(on_b, what="the sandbox to run again on node b")
            assert (moved["incarnation"], moved["restarts"]) == (2, 1)
            # Fresh, and it says what was lost.
            assert "lost" in moved["end_reason"] and "files" in moved["end_reason"]
            again = run(api, sandbox["id"], "cat note.txt 2>/dev/null || echo fresh")
            assert again["stdout"] == "fresh\n"

            never = create(api, restart="never")
            run(api, never["id"], "true")
            holder = status_of(api, never["id"])["node_id"]
            survivor = cluster.start_shuttle("c")
            del survivor
            cluster.shuttles[1].stop(signal.SIGKILL)  # b, which holds both now
            assert holder == status_of(api, sandbox["id"])["node_id"]
            failed = reaches(api, never["id"], "failed")
            assert "lost" in failed["end_reason"]
    finally:
        cluster.stop()


def test_sandboxes_outlive_a_weaver_restart(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver()
        cluster.start_shuttle("a")
        with cluster.client() as api:
            sandbox = create(api)
            run(api, sandbox["id"], "echo kept > note.txt")
        assert cluster.weaver is not None
        cluster.weaver.stop()
        cluster.start_weaver()
        with cluster.client() as api:
            # The node reconnects and reports it; nothing was restarted.
            def answers() -> dict[str, Any] | None:
                response = api.post(
                    f"/v1/sandboxes/{sandbox['id']}/exec", json={"cmd": ["cat", "note.txt"]}
                )
                return dict(response.json()) if response.status_code == 200 else None

            assert eventually(answers, what="the sandbox to answer again")["stdout"] == "kept\n"
            after = status_of(api, sandbox["id"])
            assert (after["status"], after["incarnation"], after["restarts"]) == (
                "running",
                1,
                0,
            )
    finally:
        cluster.stop()


def exec_socket(cluster: Cluster, sandbox_id: str) -> Any:
    url = cluster.url.replace("http", "ws", 1) + f"/v1/sandboxes/{sandbox_id}/exec"
    return connect(url, additional_headers={"Authorization": f"Bearer {cluster.admin_key}"})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def exited(code: int | None = None, signal: int | None = None, **more: Any) -> dict[str, Any]:
    return {
        "exit": {"exit_code": code, "signal": signal, "error": None, "timed_out": False, **more}
    }


def test_an_interactive_exec_streams_both_ways(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
    with exec_socket(cluster, sandbox["id"]) as ws:
        started = start(ws, cmd=["sh", "-c", "while read line; do echo got $line; done"])
        assert started["pid"] > 1 and started["tag"] is None
        ws.send(json.dumps({"stdin": b64(b"one\n")}))
        assert json.loads(ws.recv()) == {"stdout": b64(b"got one\n")}
        ws.send(json.dumps({"stdin": b64(b"two\n"), "eof": True}))
        assert json.loads(ws.recv()) == {"stdout": b64(b"got two\n")}
        assert json.loads(ws.recv()) == exited(0)

    # A terminal: its size, then a signal ends what runs in it.
    with exec_socket(cluster, sandbox["id"]) as ws:
        start(ws, cmd="stty size; echo ready; exec sleep 600", pty={"rows": 40, "cols": 120})
        seen = b""
        while b"ready" not in seen:
            seen += base64.b64decode(json.loads(ws.recv())["stdout"])
        assert b"40 120" in seen
        ws.send(json.dumps({"signal": 15}))
        last = json.loads(ws.recv())
        assert last == exited(signal=15)

    with exec_socket(cluster, sandbox["id"]) as ws:
        ws.send(json.dumps({"cmd": []}))
        refused = json.loads(ws.recv())
        assert refused["error"]["code"] in ("invalid_request", "validation_error")
    with cluster.client() as api:
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_tenant_limits_on_sandboxes_and_streams(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(max_sandboxes_per_tenant="2", max_exec_streams_per_tenant="1")
        cluster.start_shuttle("a")
        with cluster.client() as api:
            first, second = create(api), create(api)
            third = api.post("/v1/sandboxes", json={})
            assert third.status_code == 429, third.text
            assert third.json()["error"]["details"]["limit"] == "max_sandboxes_per_tenant"
            # One stream at a time: a second exec while one runs is refused, then allowed.
            with exec_socket(cluster, first["id"]) as ws:
                start(ws, cmd="echo up; exec sleep 600")
                assert json.loads(ws.recv()) == {"stdout": b64(b"up\n")}
                busy = api.post(f"/v1/sandboxes/{second['id']}/exec", json={"cmd": "true"})
                assert busy.status_code == 429, busy.text
                ws.send(json.dumps({"signal": 9}))
                assert json.loads(ws.recv())["exit"]["signal"] == 9
            assert run(api, second["id"], "echo free")["stdout"] == "free\n"
            # A stopped sandbox no longer counts.
            api.delete(f"/v1/sandboxes/{first['id']}")
            reaches(api, first["id"], "stopped")
            assert api.post("/v1/sandboxes", json={}).status_code == 201
    finally:
        cluster.stop()


def test_files_both_ways_through_the_api(cluster: Cluster) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    with cluster.client() as api:
        sandbox = create(api)
        files = f"/v1/sandboxes/{sandbox['id']}/files"
        written = api.put(f"{files}/content", params={"path": "in/blob.bin"}, content=data)
        assert written.status_code == 200, written.text
        assert written.json()["size"] == len(data)
        read = api.get(f"{files}/content", params={"path": "in/blob.bin"})
        assert read.status_code == 200 and read.content == data
        assert run(api, sandbox["id"], "wc -c < in/blob.bin")["stdout"].strip() == str(len(data))

        assert api.post(f"{files}/mkdir", json={"path": "a/b"}).json()["created"] is True
        moved = api.post(f"{files}/move", json={"source": "in/blob.bin", "target": "a/b/x"})
        assert moved.status_code == 200, moved.text
        listed = api.get(files, params={"path": "a", "depth": 2}).json()["items"]
        assert [(i["name"], i["type"]) for i in listed] == [("b", "dir"), ("x", "file")]
        assert api.get(f"{files}/stat", params={"path": "a/b/x"}).json()["size"] == len(data)
        assert api.delete(files, params={"path": "a"}).status_code == 204

        missing = api.get(f"{files}/content", params={"path": "a/b/x"})
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["details"]["errno"] == "ENOENT"
        assert api.get(f"{files}/stat", params={"path": "nope"}).status_code == 404
        for bad in ({"path": ""}, {"path": "a\x00b"}, {}):
            assert api.get(f"{files}/stat", params=bad).status_code == 422, bad
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_a_full_disk_is_507_naming_the_quota(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle("ns0", "--runtime", "namespace")
        with cluster.client() as api:
            sandbox = create(api, resources={"disk_mib": 2})
            files = f"/v1/sandboxes/{sandbox['id']}/files"
            response = api.put(
                f"{files}/content", params={"path": "big.bin"}, content=b"x" * (4 * 1024 * 1024)
            )
            assert response.status_code == 507, response.text
            assert response.json()["error"]["details"]["quota_mib"] == 2
            # The host's files are not the sandbox's: its own view answers.
            host_only = tmp_path / "host-only.txt"
            host_only.write_text("secret")
            leak = api.get(f"{files}/content", params={"path": f"../../..{host_only}"})
            assert leak.status_code == 404, leak.text
            api.delete(f"/v1/sandboxes/{sandbox['id']}")
    finally:
        cluster.stop()


def test_request_fields_at_their_limit_and_one_past(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api, metadata={"k": "v" * 512})
        assert api.post("/v1/sandboxes", json={"metadata": {"k": "v" * 513}}).status_code == 422
        files = f"/v1/sandboxes/{sandbox['id']}/files"
        # 4,096 characters reach the sandbox, whose own answer is a clear 4xx; one more is
        # refused before it leaves Weaver.
        at_limit = api.get(f"{files}/stat", params={"path": "a" * 4096})
        assert at_limit.status_code == 422, at_limit.text
        assert at_limit.json()["error"]["details"]["errno"] == "ENAMETOOLONG"
        assert api.get(f"{files}/stat", params={"path": "a" * 4097}).status_code == 422
        exec_url = f"/v1/sandboxes/{sandbox['id']}/exec"
        week = 7 * 24 * 3600
        assert api.post(exec_url, json={"cmd": "true", "timeout_s": week}).status_code == 200
        assert api.post(exec_url, json={"cmd": "true", "timeout_s": week + 1}).status_code == 422
        assert api.post(exec_url, json={"cmd": "true", "tag": "t" * 256}).status_code == 200
        assert api.post(exec_url, json={"cmd": "true", "tag": "t" * 257}).status_code == 422
        many = ["true"] + ["x"] * 4095
        assert api.post(exec_url, json={"cmd": many}).status_code == 200
        assert api.post(exec_url, json={"cmd": [*many, "x"]}).status_code == 422
    for rows, refused in ((1000, False), (1001, True)):
        with exec_socket(cluster, sandbox["id"]) as ws:
            ws.send(json.dumps({"cmd": "stty size", "pty": {"rows": rows, "cols": 80}}))
            first = json.loads(ws.recv())
            assert ("error" in first) is refused, first
    with cluster.client() as api:
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_exec_and_files_as_another_user_of_the_sandbox(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle("ns0", "--runtime", "namespace")
        _as_another_user(cluster)
    finally:
        cluster.stop()


def _as_another_user(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        sid = sandbox["id"]
        assert run(api, sid, "id -u")["stdout"] == "1000\n"
        as_root = run(api, sid, "id -u; echo $USER", user="root")
        assert as_root["stdout"] == "0\nroot\n"

        written = api.put(
            f"/v1/sandboxes/{sid}/files/content",
            params={"path": "/tmp/secret", "mode": 0o600, "user": "root"},
            content=b"s3cret",
        )
        assert written.status_code == 200, written.text
        read = api.get(f"/v1/sandboxes/{sid}/files/content", params={"path": "/tmp/secret"})
        assert (read.status_code, read.json()["error"]["details"]["errno"]) == (403, "EACCES")
        read = api.get(
            f"/v1/sandboxes/{sid}/files/content", params={"path": "/tmp/secret", "user": "root"}
        )
        assert (read.status_code, read.content) == (200, b"s3cret")
        listed = api.get(f"/v1/sandboxes/{sid}/files/stat", params={"path": "/tmp/secret"}).json()
        assert (listed["uid"], listed["mode"]) == (0, 0o600)

        unknown = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true", "user": "nobody2"})
        assert unknown.status_code == 422, unknown.text
        assert unknown.json()["error"]["details"]["user"] == "nobody2"
        malformed = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true", "user": "a b"})
        assert malformed.status_code == 422, malformed.text
        api.delete(f"/v1/sandboxes/{sid}")
