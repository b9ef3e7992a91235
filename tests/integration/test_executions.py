"""Executions end to end: a real Weaver and a real Shuttle process, over loopback."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.cluster import PYTHON, Cluster, eventually
from support.processes import pids_with

pytestmark = pytest.mark.integration


def register(api: httpx.Client, name: str, command: list[str], **extra: Any) -> dict[str, Any]:
    response = api.post("/v1/functions", json={"name": name, "command": command, **extra})
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def run(api: httpx.Client, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = api.post(f"/v1/functions/{name}/invoke", params={"wait": 60}, json=body or {})
    assert response.status_code == 200, response.text
    return dict(response.json())


def output(api: httpx.Client, execution_id: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/executions/{execution_id}/output").json())


def test_cocore_example_prints_13(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "add", [PYTHON, "-c", "print(4 + 9)"])
        execution = run(api, "add")
        assert execution["state"] == "success"
        assert execution["exit_code"] == 0
        assert execution["error"] is None
        assert set(execution["timestamps"]) == {"open", "running", "success"}
        out = output(api, execution["id"])
        assert out == {
            "stdout": "13\n",
            "stderr": "",
            "attempt": 1,
            "complete": True,
            "next_seq": 1,
        }


def test_args_reach_the_code_by_placeholder_file_and_stdin(cluster: Cluster) -> None:
    script = (
        "import json, os, sys\n"
        "args = json.load(open(os.environ['TREADLE_ARGS_FILE']))\n"
        "print(sys.argv[1], args['a'] + args['b'], sys.stdin.read())\n"
        "os.write(3, (json.dumps({'sum': args['a'] + args['b']}) + '\\n').encode())\n"
    )
    with cluster.client() as api:
        register(
            api, "summer", [PYTHON, "main.py", "{greeting}"], source=script, source_name="main.py"
        )
        execution = run(
            api, "summer", {"args": {"a": 4, "b": 9, "greeting": "hi"}, "stdin": "from stdin"}
        )
        assert execution["state"] == "success", output(api, execution["id"])
        assert output(api, execution["id"])["stdout"] == "hi 13 from stdin\n"
        assert execution["result"] == {"sum": 13}


def test_nonzero_exit_is_failure_with_exit_code(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "fails", ["/bin/sh", "-c", "echo oops >&2; exit 3"])
        execution = run(api, "fails")
        assert (execution["state"], execution["exit_code"], execution["error"]) == (
            "failure",
            3,
            "exit_code",
        )
        assert output(api, execution["id"])["stderr"] == "oops\n"


def test_missing_program_fails_with_spawn_failed(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "missing", ["/nonexistent/program"])
        execution = run(api, "missing")
        assert (execution["state"], execution["error"]) == ("failure", "spawn_failed")


def test_timeout_kills_and_reports_timeout(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "slow", ["/bin/sleep", "60"], timeout_s=0.5)
        execution = run(api, "slow")
        assert (execution["state"], execution["error"]) == ("timeout", "timeout")


def test_cancel_kills_the_whole_process_tree(cluster: Cluster, tmp_path: Path) -> None:
    marker = f"treadle-cancel-{uuid.uuid4().hex}"
    started = tmp_path / "started"
    with cluster.client() as api:
        # a background grandchild and a foreground child, both named with the marker
        register(
            api,
            "sleeper",
            [
                "/bin/bash",
                "-c",
                f"(exec -a {marker} sleep 300) & touch {started}; exec -a {marker}-fg sleep 301",
            ],
        )
        execution = api.post("/v1/functions/sleeper/invoke", json={}).json()
        eventually(started.exists, what="the job to start")
        eventually(lambda: len(pids_with(marker)) == 2, what="both processes")
        response = api.post(f"/v1/executions/{execution['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "cancelled"
        eventually(lambda: not pids_with(marker), what="the process tree to be killed")
        final = api.get(f"/v1/executions/{execution['id']}").json()
        assert final["state"] == "cancelled"
        again = api.post(f"/v1/executions/{execution['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "invalid_transition"


def test_cancel_of_open_execution(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "huge", ["/bin/true"], resources={"memory_mib": 10_000_000})
        execution = api.post("/v1/functions/huge/invoke", json={}).json()
        pending = eventually(
            lambda: api.get(f"/v1/executions/{execution['id']}").json()["pending_reason"],
            what="a pending reason",
        )
        assert "too little free memory" in pending
        response = api.post(f"/v1/executions/{execution['id']}/cancel")
        assert response.json()["state"] == "cancelled"
        assert response.json()["node_id"] is None


def test_100k_lines_arrive_complete_and_in_order(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(
            api,
            "lines",
            [
                PYTHON,
                "-c",
                "import sys\nfor i in range(100000): print(i)\nprint('err', file=sys.stderr)",
            ],
        )
        execution = run(api, "lines")
        assert execution["state"] == "success"
        out = output(api, execution["id"])
        assert out["complete"] is True
        assert out["stdout"].splitlines() == [str(i) for i in range(100000)]
        assert out["stderr"] == "err\n"


def test_follow_streams_output_while_it_runs(cluster: Cluster, tmp_path: Path) -> None:
    import websockets.sync.client as ws_client

    gate = tmp_path / "gate"
    script = (
        "import os, sys, time\n"
        "print('first', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "print('second', flush=True)\n"
    )
    with cluster.client() as api:
        register(api, "gated", [PYTHON, "-c", script])
        execution = api.post("/v1/functions/gated/invoke", json={}).json()
        url = cluster.url.replace("http", "ws") + f"/v1/executions/{execution['id']}/output"
        with ws_client.connect(
            url, additional_headers={"Authorization": f"Bearer {cluster.admin_key}"}
        ) as ws:
            first = json.loads(ws.recv(timeout=30))
            assert first == {"type": "chunk", "stream": "stdout", "seq": 0, "data": "first\n"}
            # live: it is still running, held by the gate
            assert api.get(f"/v1/executions/{execution['id']}").json()["state"] == "running"
            gate.touch()
            messages = []
            while True:
                message = json.loads(ws.recv(timeout=30))
                messages.append(message)
                if message["type"] == "end":
                    break
        assert [m["data"] for m in messages if m["type"] == "chunk"] == ["second\n"]
        assert messages[-1]["execution"]["state"] == "success"


def test_idempotency_key_returns_the_same_execution(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "once", ["/bin/true"])
        body = {"idempotency_key": f"k-{uuid.uuid4()}"}
        first = api.post("/v1/functions/once/invoke", json=body)
        second = api.post("/v1/functions/once/invoke", json=body)
        assert first.json()["id"] == second.json()["id"]
        listed = api.get("/v1/executions", params={"function": "once", "limit": 500}).json()
        assert [e["id"] for e in listed["items"]].count(first.json()["id"]) == 1
        # A key PostgreSQL's text could not store is refused, on every store alike.
        nul = api.post("/v1/functions/once/invoke", json={"idempotency_key": "a\x00b"})
        assert nul.status_code == 422, nul.text


def test_list_filters_and_paginates(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "pager", ["/bin/true"])
        ids = {run(api, "pager")["id"] for _ in range(5)}
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"function": "pager", "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = api.get("/v1/executions", params=params).json()
            seen += [item["id"] for item in page["items"]]
            assert all(item["function"] == "pager" for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert set(seen) == ids and len(seen) == 5
        assert seen == sorted(seen, reverse=True)
        successes = api.get(
            "/v1/executions", params={"function": "pager", "state": "success"}
        ).json()
        assert len(successes["items"]) == 5


def test_function_versions_and_delete(cluster: Cluster) -> None:
    with cluster.client() as api:
        v1 = register(api, "versioned", ["/bin/echo", "one"])
        v2 = register(api, "versioned", ["/bin/echo", "two"])
        assert (v1["version"], v2["version"]) == (1, 2)
        assert output(api, run(api, "versioned")["id"])["stdout"] == "two\n"
        old = api.post("/v1/functions/versioned/invoke", params={"version": 1, "wait": 60})
        assert output(api, old.json()["id"])["stdout"] == "one\n"
        names = [f["name"] for f in api.get("/v1/functions").json()["items"]]
        assert "versioned" in names
        assert api.delete("/v1/functions/versioned").status_code == 204
        assert api.get("/v1/functions/versioned").status_code == 404
        assert api.post("/v1/functions/versioned/invoke", json={}).status_code == 404


def test_code_does_not_see_shuttle_environment(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "env", ["/usr/bin/env"], env={"MINE": "yes"})
        out = output(api, run(api, "env")["id"])["stdout"]
        assert "MINE=yes" in out
        # it asked for no GPU, so it is shown none
        assert "CUDA_VISIBLE_DEVICES=\n" in out
        assert "TREADLE_SHUTTLE" not in out
        assert cluster.join_token not in out
        home = next(line for line in out.splitlines() if line.startswith("HOME="))
        assert home != f"HOME={os.environ.get('HOME')}"


def test_nul_in_output_is_stored_on_every_backend(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "nul", ["/usr/bin/printf", "a\\000b\\n"])
        execution = run(api, "nul")
        assert execution["state"] == "success"
        out = output(api, execution["id"])
        assert out["complete"] is True
        assert out["stdout"] == "a\ufffdb\n"  # documented: NUL becomes U+FFFD


def test_nul_in_stdin_is_refused_on_every_backend(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "cat", ["/bin/cat"])
        response = api.post("/v1/functions/cat/invoke", json={"stdin": "a\u0000b"})
        assert response.status_code == 422
        assert "stdin" in response.json()["error"]["message"]
