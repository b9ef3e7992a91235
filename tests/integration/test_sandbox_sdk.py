"""The sandbox SDK (`Sandbox`, `AsyncSandbox`) against a real Weaver and Shuttle."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from support.cluster import PYTHON, Cluster, eventually, free_port
from treadle import AsyncSandbox, Sandbox
from treadle.client import (
    AsyncSandboxProcess,
    Client,
    SandboxProcess,
    TreadleAPIError,
)

pytestmark = pytest.mark.integration


def keys(cluster: Cluster) -> dict[str, str]:
    return {"url": cluster.url, "api_key": cluster.admin_key}


def read_until(process: SandboxProcess, wanted: bytes) -> dict[str, bytes]:
    """The output, per channel, up to the point where stdout holds `wanted`."""
    seen = {"stdout": b"", "stderr": b""}
    for channel, data in process:
        seen[channel] += data
        if wanted in seen["stdout"]:
            return seen
    raise AssertionError(f"the process ended before writing {wanted!r}: {seen}")


async def aread_until(process: AsyncSandboxProcess, wanted: bytes) -> dict[str, bytes]:
    seen = {"stdout": b"", "stderr": b""}
    async for channel, data in process:
        seen[channel] += data
        if wanted in seen["stdout"]:
            return seen
    raise AssertionError(f"the process ended before writing {wanted!r}: {seen}")


# --- sync ------------------------------------------------------------------------------


def test_create_run_and_kill_at_the_end_of_the_block(cluster: Cluster) -> None:
    with Sandbox.create(
        timeout=120, metadata={"sdk": "run"}, env={"GREETING": "hello"}, **keys(cluster)
    ) as sbx:
        assert sbx.id.startswith("sbx_")
        assert sbx.info["metadata"] == {"sdk": "run"} and sbx.info["timeout_s"] == 120
        first = sbx.run("echo $GREETING; echo oops >&2; exit 3")
        assert (first.stdout, first.stderr, first.exit_code, first.ok) == (
            "hello\n",
            "oops\n",
            3,
            False,
        )
        tagged = sbx.run("true", tag="first")
        assert isinstance(tagged.pid, int) and tagged.tag == "first"
        argv = sbx.run(["sh", "-c", 'printf "%s|" "$@"', "sh", "a b", "c"])
        assert (argv.stdout, argv.exit_code, argv.ok) == ("a b|c|", 0, True)
        piped = sbx.run("wc -c", stdin="x" * 1000, env={"X": "1"}, cwd="/")
        assert piped.stdout.strip() == "1000"
        killed = sbx.run("kill -TERM $$")
        assert (killed.exit_code, killed.signal, killed.ok) == (None, 15, False)
        assert sbx.wait_for_status("running")["status"] == "running"
    assert sbx.info["desired"] == "stopped"
    with Sandbox.connect(sbx.id, **keys(cluster)) as again:
        assert again.wait_for_status("stopped")["ended_at"] is not None


def test_exec_streams_stdin_in_and_output_out_as_it_comes(cluster: Cluster) -> None:
    with Sandbox.create(**keys(cluster)) as sbx:
        script = "echo ready; while read line; do echo got $line; done; exit 4"
        with sbx.exec(["sh", "-c", script], stdin=True, tag="echoer") as process:
            assert isinstance(process.pid, int) and process.tag == "echoer"
            assert read_until(process, b"ready\n")["stdout"] == b"ready\n"
            process.write(b"one\n")
            assert read_until(process, b"got one\n")["stdout"] == b"got one\n"
            process.write("two\n")  # text goes as UTF-8
            process.close_stdin()
            result = process.wait()
        assert (result.exit_code, result.signal, result.ok) == (4, None, False)
        assert (result.stdout, result.stderr) == ("got two\n", "")
        assert process.result is result

        # Bytes given as stdin are written then closed; both channels kept apart.
        with sbx.exec("cat; echo done >&2", stdin=b"\x00\x01\xff") as process:
            chunks = {"stdout": b"", "stderr": b""}
            for channel, data in process:
                chunks[channel] += data
        assert chunks == {"stdout": b"\x00\x01\xff", "stderr": b"done\n"}
        assert process.result is not None and process.result.exit_code == 0


def test_a_signal_ends_a_streamed_process(cluster: Cluster) -> None:
    with Sandbox.create(**keys(cluster)) as sbx:
        with sbx.exec("echo up; exec sleep 600") as process:
            read_until(process, b"up\n")
            process.signal(signal.SIGTERM)
            result = process.wait()
        assert (result.exit_code, result.signal, result.ok) == (None, 15, False)


def test_a_terminal_has_the_size_asked_and_follows_a_resize(cluster: Cluster) -> None:
    with (
        Sandbox.create(**keys(cluster)) as sbx,
        sbx.exec("stty size; read x; stty size", pty=(40, 120), stdin=True) as process,
    ):
        read_until(process, b"40 120")
        process.resize(50, 100)
        process.write(b"\n")
        assert b"50 100" in read_until(process, b"50 100")["stdout"]
        assert process.wait().exit_code == 0


def test_files_round_trip_exact_bytes(cluster: Cluster) -> None:
    blob = bytes(range(256)) * 64 + os.urandom(300_000)
    with Client(cluster.url, cluster.admin_key) as client:
        with Sandbox.create(client=client) as sbx:
            assert sbx.files.write("in/blob.bin", blob) == {
                "path": "in/blob.bin",
                "size": len(blob),
            }
            assert sbx.files.read("in/blob.bin") == blob
            sbx.files.write("in/note.txt", "héllo\n", mode=0o600)
            assert sbx.files.read_text("in/note.txt") == "héllo\n"
            note = sbx.files.stat("in/note.txt")
            assert (note["type"], note["size"], note["mode"] & 0o777) == ("file", 7, 0o600)
            assert sbx.run("od -An -tx1 in/note.txt | tr -d ' \\n'").stdout == ("68c3a96c6c6f0a")

            assert sbx.files.mkdir("a/b") is True
            assert sbx.files.mkdir("a/b") is False
            sbx.files.move("in/blob.bin", "a/b/x")
            listed = sbx.files.list("a", depth=2)
            assert [(i["name"], i["type"]) for i in listed] == [("b", "dir"), ("x", "file")]
            assert [i["name"] for i in sbx.files.list("in")] == ["note.txt"]
            sbx.files.remove("a")
            with pytest.raises(TreadleAPIError) as missing:
                sbx.files.read("a/b/x")
            assert (missing.value.status, missing.value.details["errno"]) == (404, "ENOENT")
        # The client given is shared, not closed: it still answers.
        assert client.healthz()["status"] == "ok"


def test_connect_and_list_by_metadata(cluster: Cluster) -> None:
    with (
        Sandbox.create(metadata={"team": "sdk", "n": "1"}, **keys(cluster)) as first,
        Sandbox.create(metadata={"team": "sdk", "n": "2"}, **keys(cluster)) as second,
    ):
        found = [item["id"] for item in Sandbox.list(metadata={"team": "sdk"}, **keys(cluster))]
        assert found == [second.id, first.id]  # newest first
        only = list(Sandbox.list(metadata={"team": "sdk", "n": "1"}, **keys(cluster)))
        assert [item["id"] for item in only] == [first.id]
        assert list(Sandbox.list(metadata={"team": "nobody"}, **keys(cluster))) == []
        running = Sandbox.list(status=["pending", "starting", "running"], **keys(cluster))
        assert {first.id, second.id} <= {item["id"] for item in running}

        connected = Sandbox.connect(first.id, **keys(cluster))
        try:
            assert connected.info["metadata"] == {"team": "sdk", "n": "1"}
            assert connected.run("echo via connect").stdout == "via connect\n"
        finally:
            connected.close()  # closes its client only
        assert first.run("true").exit_code == 0

    with pytest.raises(TreadleAPIError) as unknown:
        Sandbox.connect("sbx_nope", **keys(cluster))
    assert unknown.value.status == 404


def test_a_stopped_sandbox_refuses_with_409(cluster: Cluster) -> None:
    with Sandbox.create(**keys(cluster)) as sbx:
        sbx.kill()
        sbx.wait_for_status("stopped")
        for attempt in (
            lambda: sbx.run("true"),
            lambda: sbx.exec("true"),
            lambda: sbx.files.read("x"),
            lambda: sbx.set_timeout(60),
        ):
            with pytest.raises(TreadleAPIError) as refused:
                attempt()
            assert refused.value.status == 409, refused.value


def test_the_process_tier_cannot_pause(cluster: Cluster) -> None:
    with Sandbox.create(**keys(cluster)) as sbx:
        sbx.wait_for_status("running")
        with pytest.raises(TreadleAPIError) as refused:
            sbx.pause()
        assert refused.value.status == 409 and "cannot be paused" in refused.value.message


def test_processes_and_attach_by_tag_and_pid(cluster: Cluster) -> None:
    with Sandbox.create(**keys(cluster)) as sbx:
        with sbx.exec("read x; echo got $x", stdin=True, tag="later") as process:
            pid = process.pid
        # Detached: it runs on, listed, and can be found again by its tag.
        listed = {item["tag"]: item for item in sbx.processes()}
        assert listed["later"]["pid"] == pid and listed["later"]["running"] is True
        with sbx.attach("later") as again:
            assert (again.pid, again.tag) == (pid, "later")
            again.write(b"it\n")
            result = again.wait()
        assert (result.exit_code, result.stdout) == (0, "got it\n")
        ended = {item["tag"]: item for item in sbx.processes()}["later"]
        assert (ended["running"], ended["exit_code"]) == (False, 0)

        with sbx.exec("echo waiting; exec sleep 600") as sleeper:
            read_until(sleeper, b"waiting\n")
        assert sleeper.pid is not None
        with sbx.attach(sleeper.pid) as again:
            signalled = sbx.signal_process(sleeper.pid, signal.SIGKILL)
            assert signalled is not None and signalled["pid"] == sleeper.pid
            assert again.wait().signal == 9


def test_a_signed_url_reaches_a_port_without_headers(cluster: Cluster) -> None:
    port = free_port()
    with Sandbox.create(**keys(cluster)) as sbx:
        sbx.files.write("site/hello.txt", b"hello from the sandbox\n")
        server = sbx.exec(
            [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd="site",
            tag="web",
        )
        server.close()
        url = sbx.url(port, path="/hello.txt", expires_in=120)
        assert url.startswith("http")

        def served() -> httpx.Response | None:
            response = httpx.get(url, timeout=10)
            return response if response.status_code == 200 else None

        response = eventually(served, what="the sandbox's web server to answer")
        assert response.content == b"hello from the sandbox\n"


# --- async -----------------------------------------------------------------------------


async def test_async_run_exec_files_and_kill_at_the_end(cluster: Cluster) -> None:
    async with AsyncSandbox.create(metadata={"sdk": "async"}, **keys(cluster)) as sbx:
        result = await sbx.run("echo hi; echo err >&2; exit 2")
        assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "err\n", 2)

        async with sbx.exec("echo ready; read x; echo got $x", stdin=True) as process:
            assert isinstance(process.pid, int)
            await aread_until(process, b"ready\n")
            await process.write(b"async\n")
            await process.close_stdin()
            ended = await process.wait()
        assert (ended.exit_code, ended.stdout) == (0, "got async\n")

        process = await sbx.exec("echo up; exec sleep 600")
        try:
            await aread_until(process, b"up\n")
            await process.signal(signal.SIGKILL)
            assert (await process.wait()).signal == 9
        finally:
            await process.close()

        data = bytes(range(256)) * 10
        assert (await sbx.files.write("d/x.bin", data))["size"] == len(data)
        assert await sbx.files.read("d/x.bin") == data
        assert await sbx.files.mkdir("d/e") is True
        await sbx.files.move("d/x.bin", "d/e/y.bin")
        assert [i["name"] for i in await sbx.files.list("d", depth=2)] == ["e", "y.bin"]
        assert (await sbx.files.stat("d/e/y.bin"))["size"] == len(data)
        await sbx.files.remove("d")

        found = [
            item["id"]
            async for item in AsyncSandbox.list(metadata={"sdk": "async"}, **keys(cluster))
        ]
        assert found == [sbx.id]
    assert sbx.info["desired"] == "stopped"

    again = await AsyncSandbox.connect(sbx.id, **keys(cluster))
    try:
        await again.wait_for_status("stopped")
        with pytest.raises(TreadleAPIError) as refused:
            await again.exec("true")
        assert refused.value.status == 409
        with pytest.raises(TreadleAPIError) as refused_run:
            await again.run("true")
        assert refused_run.value.status == 409
    finally:
        await again.aclose()


async def test_async_attach_and_processes(cluster: Cluster) -> None:
    async with AsyncSandbox.create(**keys(cluster)) as sbx:
        async with sbx.exec("read x; echo got $x", stdin=True, tag="a1") as process:
            pid = process.pid
        assert [p["pid"] for p in await sbx.processes() if p["tag"] == "a1"] == [pid]
        async with sbx.attach("a1") as again:
            assert again.pid == pid
            await again.write("later\n")
            assert (await again.wait()).stdout == "got later\n"


# --- pausing, in a tier that can ---------------------------------------------------------


@pytest.fixture(scope="module")
def namespace_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("ns-cluster"))
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle("ns0", "--runtime", "namespace")
        yield cluster
    finally:
        cluster.stop()


def test_pause_freezes_and_resume_thaws(namespace_cluster: Cluster) -> None:
    with Sandbox.create(**keys(namespace_cluster)) as sbx:
        sbx.run("echo kept > note.txt")
        assert sbx.pause()["desired"] == "paused"
        assert sbx.wait_for_status("paused")["status"] == "paused"
        with pytest.raises(TreadleAPIError) as refused:
            sbx.run("true")
        assert refused.value.status == 409
        assert sbx.resume()["desired"] == "running"
        sbx.wait_for_status("running")
        assert sbx.run("cat note.txt").stdout == "kept\n"
        assert sbx.set_timeout(600)["timeout_s"] is not None


@pytest.fixture
async def paused_sandbox(namespace_cluster: Cluster) -> AsyncIterator[AsyncSandbox]:
    async with AsyncSandbox.create(**keys(namespace_cluster)) as sbx:
        await sbx.run("true")
        await sbx.pause()
        yield sbx


async def test_async_pause_and_resume(paused_sandbox: AsyncSandbox) -> None:
    assert (await paused_sandbox.wait_for_status("paused"))["status"] == "paused"
    await paused_sandbox.resume()
    assert (await paused_sandbox.wait_for_status("running"))["status"] == "running"
    assert (await paused_sandbox.run("echo thawed")).stdout == "thawed\n"


def test_a_directory_is_watched_from_the_sdk(cluster: Cluster) -> None:
    with Sandbox.create(**keys(cluster)) as sbx:
        sbx.files.mkdir("watched")
        changes = sbx.files.watch("watched", recursive=True)
        sbx.files.write("watched/a.txt", b"one")  # made after watch() returned: seen
        sbx.files.remove("watched/a.txt")
        seen = []
        for change in changes:
            seen.append(change)
            if change["type"] == "remove":
                break
        changes.close()  # type: ignore[attr-defined]
        assert {"type": "create", "name": "a.txt", "dir": False} in seen
        assert seen[-1] == {"type": "remove", "name": "a.txt", "dir": False}
        with pytest.raises(TreadleAPIError) as missing:
            sbx.files.watch("nowhere")
        assert missing.value.status == 404


async def test_a_directory_is_watched_from_the_async_sdk(cluster: Cluster) -> None:
    async with AsyncSandbox.create(**keys(cluster)) as sbx:
        await sbx.files.mkdir("w")
        changes = await sbx.files.watch("w")
        await sbx.files.write("w/b.txt", "two")
        async for change in changes:
            assert change == {"type": "create", "name": "b.txt", "dir": False}
            break
        await changes.aclose()  # type: ignore[attr-defined]
