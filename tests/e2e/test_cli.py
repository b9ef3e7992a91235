"""The `treadle` CLI against a real Weaver and Shuttle, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.cluster import PYTHON, Cluster, eventually


def treadle(
    cluster: Cluster, *args: str, stdin: str | None = None, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(cluster.env, TREADLE_URL=cluster.url, TREADLE_API_KEY=key or cluster.admin_key)
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quickstart_prints_13(cluster: Cluster) -> None:
    created = treadle(cluster, "fn", "create", "add", "--command", 'python3 -c "print(4 + 9)"')
    assert created.returncode == 0, created.stderr
    result = treadle(cluster, "invoke", "add")
    assert (result.returncode, result.stdout) == (0, "13\n")


def test_admin_key_is_found_without_flags(cluster: Cluster, tmp_path: Path) -> None:
    env = dict(cluster.env, TREADLE_URL=cluster.url, TREADLE_HOME=str(cluster.home))
    result = subprocess.run(
        [sys.executable, "-m", "treadle", "fn", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("command", "code"),
    [("exit 0", 0), ("exit 3", 3), ("exit 1", 1), ("kill -SEGV $$", 139)],
)
def test_invoke_exit_code_mirrors_the_execution(cluster: Cluster, command: str, code: int) -> None:
    treadle(cluster, "fn", "create", "exits", "--command", f"/bin/sh -c '{command}'")
    assert treadle(cluster, "invoke", "exits").returncode == code


def test_invoke_timeout_exits_124(cluster: Cluster) -> None:
    treadle(cluster, "fn", "create", "naps", "--command", "sleep 30", "--timeout", "0.3")
    assert treadle(cluster, "invoke", "naps").returncode == 124


def test_invoke_streams_stdout_and_stderr_separately(cluster: Cluster) -> None:
    treadle(
        cluster,
        "fn",
        "create",
        "both",
        "--command",
        "/bin/sh -c 'echo out; echo err >&2; echo out2'",
    )
    result = treadle(cluster, "invoke", "both")
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\nout2\n", "err\n")


def test_invoke_with_args_and_stdin(cluster: Cluster, tmp_path: Path) -> None:
    treadle(
        cluster,
        "fn",
        "create",
        "echoer",
        "--command",
        f"{PYTHON} -c 'import sys; print(sys.argv[1], sys.stdin.read())' {{word}}",
    )
    data = tmp_path / "in.txt"
    data.write_text("piped")
    result = treadle(cluster, "invoke", "echoer", "--arg", "word=hello", "--stdin", str(data))
    assert (result.returncode, result.stdout) == (0, "hello piped\n")


def test_fn_create_from_a_script_file(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import json, os\nprint(json.load(open(os.environ['TREADLE_ARGS_FILE'])))\n")
    assert treadle(cluster, "fn", "create", "script", "--file", str(script)).returncode == 0
    result = treadle(cluster, "invoke", "script", "--args", '{"n": 1}')
    assert (result.returncode, result.stdout) == (0, "{'n': 1}\n")


def test_detach_then_logs_follow_and_ps(cluster: Cluster) -> None:
    treadle(cluster, "fn", "create", "count", "--command", "seq 1 5")
    detached = treadle(cluster, "invoke", "count", "--detach")
    assert detached.returncode == 0
    execution_id = detached.stdout.strip()
    assert execution_id.startswith("ex_")
    logs = treadle(cluster, "logs", "-f", execution_id)
    assert (logs.returncode, logs.stdout) == (0, "1\n2\n3\n4\n5\n")
    listed = treadle(cluster, "ps", "--json")
    assert execution_id in [item["id"] for item in json.loads(listed.stdout)]


def test_cancel_from_another_terminal_ends_invoke_with_130(
    cluster: Cluster, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    treadle(
        cluster,
        "fn",
        "create",
        "waits",
        "--command",
        f"/bin/sh -c 'touch {started}; exec sleep 60'",
    )
    env = dict(cluster.env, TREADLE_URL=cluster.url, TREADLE_API_KEY=cluster.admin_key)
    invoke = subprocess.Popen(
        [sys.executable, "-m", "treadle", "invoke", "waits"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(started.exists, what="the execution to start")
        running = json.loads(treadle(cluster, "ps", "--json", "--state", "running").stdout)
        execution_id = next(item["id"] for item in running if item["function"] == "waits")
        cancelled = treadle(cluster, "cancel", execution_id)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        assert invoke.wait(timeout=60) == 130
    finally:
        if invoke.poll() is None:
            invoke.send_signal(signal.SIGKILL)
        invoke.communicate()


def test_api_errors_are_one_line_not_a_traceback(cluster: Cluster) -> None:
    result = treadle(cluster, "invoke", "does-not-exist")
    assert result.returncode == 1
    assert "error:" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr
    bad_key = treadle(cluster, "ps", key="tk_wrong")
    assert bad_key.returncode == 1 and "Traceback" not in bad_key.stderr


def test_unreachable_weaver_is_a_clear_error(cluster: Cluster) -> None:
    env = dict(cluster.env, TREADLE_URL="http://127.0.0.1:9", TREADLE_API_KEY="tk_x")
    result = subprocess.run(
        [sys.executable, "-m", "treadle", "ps"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr


def test_nodes_lists_the_local_shuttle(cluster: Cluster) -> None:
    result = treadle(cluster, "nodes", "--json")
    nodes = json.loads(result.stdout)
    assert [n["name"] for n in nodes] == ["node0"]
    assert nodes[0]["runtimes"] == ["process"] and nodes[0]["connected"] is True


def test_tenant_create_gives_a_working_key(cluster: Cluster) -> None:
    result = treadle(cluster, "tenant", "create", "cli-tenant", "--json")
    key = json.loads(result.stdout)["api_key"]
    assert treadle(cluster, "fn", "list", key=key).returncode == 0
    assert os.environ.get("TREADLE_API_KEY") != key


def test_tenant_allow_process_by_name_or_id_and_revoke(cluster: Cluster) -> None:
    assert treadle(cluster, "tenant", "create", "cli-trusted").returncode == 0
    listed = json.loads(treadle(cluster, "tenant", "list", "--json").stdout)
    tenant = next(t for t in listed if t["name"] == "cli-trusted")
    assert tenant["allow_process_tier"] is False

    allowed = treadle(cluster, "tenant", "allow-process", "cli-trusted")
    assert allowed.returncode == 0 and "cli-trusted" in allowed.stdout, allowed
    assert "may use the process tier" in allowed.stdout
    table = treadle(cluster, "tenant", "list").stdout
    assert "allowed" in next(line for line in table.splitlines() if "cli-trusted" in line)

    revoked = treadle(cluster, "tenant", "allow-process", tenant["id"], "--revoke", "--json")
    assert json.loads(revoked.stdout)["allow_process_tier"] is False
    missing = treadle(cluster, "tenant", "allow-process", "nobody")
    assert missing.returncode == 1 and "no tenant named 'nobody'" in missing.stderr


def test_map_prints_a_line_per_input_in_order(cluster: Cluster, tmp_path: Path) -> None:
    made = treadle(cluster, "fn", "create", "echoes", "--command", "echo {word}")
    assert made.returncode == 0, made.stderr
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"word": "a"}\n{"word": "b"}\n\n{"word": "c"}\n')
    done = treadle(cluster, "map", "echoes", "--args-file", str(inputs), "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert {line["state"] for line in lines} == {"success"}
    # One input refused (its placeholder has no value): its line says why, the exit code 1.
    refused = treadle(cluster, "map", "echoes", "--args-file", "-", stdin='[{"word": "x"}, {}]')
    assert refused.returncode == 1
    first, second = (json.loads(line) for line in refused.stdout.splitlines())
    assert first["state"] == "success" and second["error"]["code"] == "invalid_request"
    broken = treadle(cluster, "map", "echoes", "--args-file", "-", stdin="[1, 2]")
    assert broken.returncode == 2 and "not a JSON object" in broken.stderr
