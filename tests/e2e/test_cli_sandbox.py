"""`treadle sandbox …` against a real Weaver and Shuttle, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.cluster import Cluster, eventually


def treadle(
    cluster: Cluster, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    # Wide enough that a table keeps each sandbox on one line.
    env = dict(
        cluster.env, TREADLE_URL=cluster.url, TREADLE_API_KEY=cluster.admin_key, COLUMNS="250"
    )
    return subprocess.run(
        [sys.executable, "-m", "treadle", "sandbox", *args],
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )


def create(cluster: Cluster, *options: str) -> str:
    created = treadle(cluster, "create", *options)
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.decode().strip()
    assert sandbox_id.startswith("sbx_")
    return sandbox_id


def test_create_ls_get_rm(cluster: Cluster) -> None:
    sandbox_id = create(cluster, "--metadata", "cli=one", "--env", "WHO=cli", "--timeout", "90")
    shown = json.loads(treadle(cluster, "get", sandbox_id).stdout)
    assert (shown["id"], shown["metadata"], shown["timeout_s"]) == (
        sandbox_id,
        {"cli": "one"},
        90,
    )
    said = treadle(cluster, "exec", sandbox_id, "--", "sh", "-c", "echo $WHO")
    assert (said.returncode, said.stdout) == (0, b"cli\n")

    listed = json.loads(treadle(cluster, "ls", "--metadata", "cli=one", "--json").stdout)
    assert [item["id"] for item in listed] == [sandbox_id]
    assert json.loads(treadle(cluster, "ls", "--metadata", "cli=none", "--json").stdout) == []
    table = treadle(cluster, "ls", "--metadata", "cli=one").stdout.decode()
    header, row = table.splitlines()
    assert header.split() == ["ID", "STATUS", "ISOLATION", "NODE", "AGE", "EXPIRES", "METADATA"]
    assert row.split()[:3] == [sandbox_id, "running", "process"] and "cli=one" in row

    removed = treadle(cluster, "rm", sandbox_id, "sbx_missing")
    assert removed.returncode == 1
    assert removed.stdout == f"{sandbox_id}\n".encode()
    assert b"error:" in removed.stderr and b"sbx_missing" in removed.stderr
    eventually(
        lambda: json.loads(treadle(cluster, "get", sandbox_id).stdout)["status"] == "stopped",
        what="the sandbox to stop",
    )
    refused = treadle(cluster, "exec", sandbox_id, "--", "true")
    assert refused.returncode == 1
    assert b"not running" in refused.stderr and b"Traceback" not in refused.stderr


def test_create_json_prints_the_sandbox(cluster: Cluster) -> None:
    options = ("--cpu", "500", "--memory", "128", "--home", "/home/agent", "--sudo")
    created = treadle(cluster, "create", "--json", *options)
    sandbox = json.loads(created.stdout)
    assert sandbox["resources"]["cpu_millicores"] == 500
    assert sandbox["resources"]["memory_mib"] == 128
    assert (sandbox["home"], sandbox["sudo"]) == ("/home/agent", True)
    assert treadle(cluster, "rm", sandbox["id"]).returncode == 0


@pytest.mark.parametrize(
    ("script", "code", "stdout", "stderr"),
    [
        ("echo out; echo err >&2; echo out2", 0, b"out\nout2\n", b"err\n"),
        ("echo partial; exit 3", 3, b"partial\n", b""),
        ("kill -TERM $$", 128 + 15, b"", b""),
    ],
)
def test_exec_streams_and_exits_with_the_process_code(
    cluster: Cluster, script: str, code: int, stdout: bytes, stderr: bytes
) -> None:
    sandbox_id = create(cluster)
    try:
        result = treadle(cluster, "exec", sandbox_id, "--", "sh", "-c", script)
        assert (result.returncode, result.stdout, result.stderr) == (code, stdout, stderr)
    finally:
        treadle(cluster, "rm", sandbox_id)


def test_exec_interactive_and_shell_without_a_terminal(cluster: Cluster) -> None:
    sandbox_id = create(cluster)
    try:
        data = b"line one\n\x00\xff binary\n"
        piped = treadle(cluster, "exec", "-i", sandbox_id, "--", "cat", stdin=data)
        assert (piped.returncode, piped.stdout) == (0, data)
        # Without -i the process's stdin is closed: cat ends at once.
        closed = treadle(cluster, "exec", sandbox_id, "--", "cat", stdin=b"ignored")
        assert (closed.returncode, closed.stdout) == (0, b"")

        shell = treadle(cluster, "shell", sandbox_id, stdin=b"echo from the shell; exit 4\n")
        assert (shell.returncode, shell.stdout) == (4, b"from the shell\n"), shell.stderr
    finally:
        treadle(cluster, "rm", sandbox_id)


def test_cp_both_ways(cluster: Cluster, tmp_path: Path) -> None:
    sandbox_id = create(cluster)
    try:
        blob = bytes(range(256)) * 40
        (tmp_path / "blob.bin").write_bytes(blob)
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "top.txt").write_text("top\n")
        (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
        (tree / "sub" / "run.sh").chmod(0o755)

        # Into the sandbox: a file under a new name, a directory into an existing one.
        blob_up = treadle(cluster, "cp", str(tmp_path / "blob.bin"), f"{sandbox_id}:in/b.bin")
        assert blob_up.returncode == 0, blob_up.stderr
        assert treadle(cluster, "exec", sandbox_id, "--", "mkdir", "dest").returncode == 0
        up = treadle(cluster, "cp", str(tree), f"{sandbox_id}:dest")
        assert up.returncode == 0, up.stderr
        found = treadle(cluster, "exec", sandbox_id, "--", "sh", "-c", "cd dest && find . | sort")
        assert found.stdout == b".\n./tree\n./tree/sub\n./tree/sub/run.sh\n./tree/top.txt\n"
        ran = treadle(cluster, "exec", sandbox_id, "--", "./dest/tree/sub/run.sh")
        assert (ran.returncode, ran.stdout) == (0, b"ran\n")
        size = treadle(cluster, "exec", sandbox_id, "--", "wc", "-c", "in/b.bin")
        assert size.stdout.split()[0] == str(len(blob)).encode()

        # And out again: a file, a directory into an existing one, and to stdout.
        out = tmp_path / "out"
        out.mkdir()
        assert treadle(cluster, "cp", f"{sandbox_id}:in/b.bin", str(out / "c.bin")).returncode == 0
        assert (out / "c.bin").read_bytes() == blob
        down = treadle(cluster, "cp", f"{sandbox_id}:dest/tree", str(out))
        assert down.returncode == 0, down.stderr
        assert (out / "tree" / "top.txt").read_text() == "top\n"
        assert (out / "tree" / "sub" / "run.sh").read_text() == "#!/bin/sh\necho ran\n"
        assert os.access(out / "tree" / "sub" / "run.sh", os.X_OK)
        to_stdout = treadle(cluster, "cp", f"{sandbox_id}:dest/tree/top.txt", "-")
        assert (to_stdout.returncode, to_stdout.stdout) == (0, b"top\n")
        from_stdin = treadle(cluster, "cp", "-", f"{sandbox_id}:piped.bin", stdin=b"\x00piped")
        assert from_stdin.returncode == 0
        assert treadle(cluster, "cp", f"{sandbox_id}:piped.bin", "-").stdout == b"\x00piped"

        missing = treadle(cluster, "cp", f"{sandbox_id}:nope.txt", str(out))
        assert missing.returncode == 1 and b"error:" in missing.stderr
        both_local = treadle(cluster, "cp", str(tmp_path / "blob.bin"), str(out))
        assert both_local.returncode == 2 and b"ID:path" in both_local.stderr
    finally:
        treadle(cluster, "rm", sandbox_id)


def test_tagged_process_ps_and_logs(cluster: Cluster) -> None:
    sandbox_id = create(cluster)
    try:
        tagged = treadle(cluster, "exec", "--tag", "job", sandbox_id, "--", "sh", "-c", "exit 5")
        assert tagged.returncode == 5
        processes = json.loads(treadle(cluster, "ps", sandbox_id, "--json").stdout)
        job = next(p for p in processes if p["tag"] == "job")
        assert (job["running"], job["exit_code"], job["argv"]) == (False, 5, ["sh", "-c", "exit 5"])
        table = treadle(cluster, "ps", sandbox_id).stdout.decode()
        assert "job" in table and "exited 5" in table
        followed = treadle(cluster, "logs", sandbox_id, "job")
        assert followed.returncode == 5, followed.stderr
        by_pid = treadle(cluster, "logs", sandbox_id, str(job["pid"]))
        assert by_pid.returncode == 5, by_pid.stderr
    finally:
        treadle(cluster, "rm", sandbox_id)


def test_url_prints_a_signed_url(cluster: Cluster) -> None:
    sandbox_id = create(cluster)
    try:
        printed = treadle(cluster, "url", sandbox_id, "8080", "--path", "/x", "--expires-in", "60")
        assert printed.returncode == 0, printed.stderr
        url = printed.stdout.decode().strip()
        assert url.startswith(cluster.url) and f"/{sandbox_id}/" in url and "8080" in url
    finally:
        treadle(cluster, "rm", sandbox_id)
