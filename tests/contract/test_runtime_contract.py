"""The contract every isolation runtime honours (DESIGN §4).

Parametrized over `available_runtimes()`, so each new tier joins this suite by being
available. The tests hold for every tier: the programs use only what a sandbox also offers
(the host's /usr, their work dir), and the test finds their processes and work dir by a tag
in their argv (see `support.runtimes`). Programs that need to be stepped from the test wait
on a FIFO "gate" the test opens: the test releases them after it has seen their previous
output, which makes ordering observable without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cluster import eventually
from support.runtimes import (
    GATED,
    PY,
    Gate,
    container_workdir,
    make_runtime,
    pids_with,
    run,
    runtime_params,
    spec,
    started,
    tag,
    wait_ended,
)
from treadle.domain.resources import Tier
from treadle.protocol.limits import RESULT_INVALID, json_depth_within
from treadle.protocol.messages import Exited
from treadle.shuttle.output import OutputDecoder
from treadle.shuttle.reaper import reap_orphans
from treadle.shuttle.runtimes import Runtime


@pytest.fixture(params=runtime_params(microvm=True))
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Runtime:
    return make_runtime(request.param, tmp_path / "home")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "work" / "ex_1-1"


@pytest.fixture
def gate(runtime: Runtime) -> Iterator[Gate]:
    g = Gate(container_workdir(runtime))
    try:
        yield g
    finally:
        g.close()


def gone(path: str | Path) -> bool:
    return not Path(path).exists()


# For programs to start a child that only sleeps, tagged `<tag>-child`; it returns once the
# child runs (its argv shows in /proc only once the new program is set up, a moment after
# exec returned to the parent).
SLEEPER = "import os, sys, time; os.close(int(sys.argv[1])); time.sleep(30)"
CHILD = f"""
import os, subprocess, sys
def sleeper(**popen):
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-c", {SLEEPER!r}, str(ready_w), sys.argv[1] + "-child"]
    subprocess.Popen(argv, pass_fds=[ready_w], **popen)
    os.close(ready_w)
    os.read(ready_r, 1)  # EOF once the child closed it
"""


async def test_runs_a_program_and_reports_its_output(runtime: Runtime, workdir: Path) -> None:
    result = await run(runtime, spec(["/bin/echo", "13"]), workdir)

    assert result.output == [("stdout", b"13\n")]
    assert result.status.exit_code == 0
    assert result.status.reason is None
    assert result.status.result is None
    assert result.status.usage.wall_ms > 0


async def test_args_env_and_stdin_reach_the_code(runtime: Runtime, workdir: Path) -> None:
    code = """
import json, os, sys
print(json.dumps({
    "args": json.load(open(os.environ["TREADLE_ARGS_FILE"])),
    "args_file": os.environ["TREADLE_ARGS_FILE"],
    "env": {k: v for k, v in os.environ.items() if k != "PWD"},
    "cwd": os.getcwd(),
    "stdin": sys.stdin.read(),
}))
"""
    s = spec(
        [PY, "-c", code],
        args={"x": 4, "names": ["a", "b"]},
        env={"GREETING": "hello"},
        stdin="line one\nline two é\n",
        id="ex_abc",
        attempt=2,
        function="adder",
    )

    result = await run(runtime, s, workdir)

    assert result.status.exit_code == 0, result.text("stderr")
    seen = json.loads(result.text("stdout"))
    assert seen["args"] == {"x": 4, "names": ["a", "b"]}
    assert Path(seen["args_file"]).is_absolute()
    assert seen["stdin"] == "line one\nline two é\n"
    env = seen["env"]
    assert env["GREETING"] == "hello"
    assert env["TREADLE_EXECUTION_ID"] == "ex_abc"
    assert env["TREADLE_ATTEMPT"] == "2"
    assert env["TREADLE_FUNCTION"] == "adder"
    assert env["TREADLE_RESULT_FD"] == "3"
    assert env["HOME"] == env["TMPDIR"] == seen["cwd"]
    assert env["LANG"] == "C.UTF-8"


async def test_stdin_is_empty_when_not_given(runtime: Runtime, workdir: Path) -> None:
    # `cat` would block forever on an inherited terminal or an open pipe.
    result = await run(runtime, spec(["cat"]), workdir)

    assert result.output == []
    assert result.status.exit_code == 0


async def test_shuttle_environment_is_not_visible(
    runtime: Runtime, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TREADLE_SHUTTLE_TOKEN", "join-secret-1234")
    monkeypatch.setenv("LEAKY", "leak")

    result = await run(runtime, spec(["/usr/bin/env"]), workdir)

    env = result.text("stdout")
    assert "join-secret-1234" not in env
    assert "TREADLE_SHUTTLE_TOKEN" not in env
    assert "LEAKY" not in env
    assert "TREADLE_EXECUTION_ID=ex_1" in env


async def test_stdout_and_stderr_arrive_in_order_of_production(
    runtime: Runtime, workdir: Path, gate: Gate
) -> None:
    code = (
        GATED
        + """
for i, stream in enumerate([sys.stdout, sys.stderr, sys.stdout, sys.stderr]):
    stream.write(f"{i}\\n")
    stream.flush()
    wait()
"""
    )
    async with started(runtime, spec([PY, "-c", code, gate.tag]), workdir) as h:
        seen = []
        async for item in h.output():
            seen.append(item)
            gate.release()
        status = await h.wait()

    assert seen == [("stdout", b"0\n"), ("stderr", b"1\n"), ("stdout", b"2\n"), ("stderr", b"3\n")]
    assert status.exit_code == 0


async def test_a_character_split_across_writes_arrives_intact(
    runtime: Runtime, workdir: Path, gate: Gate
) -> None:
    code = (
        GATED
        + """
os.write(1, b"caf\\xc3")
wait()
os.write(1, b"\\xa9\\n")
"""
    )
    decoder = OutputDecoder()
    text = []
    reads = []
    async with started(runtime, spec([PY, "-c", code, gate.tag]), workdir) as h:
        async for stream, data in h.output():
            reads.append(data)
            text += decoder.feed(stream, data)
            gate.release()
    text += [t for _, t in decoder.finish()]

    assert reads == [b"caf\xc3", b"\xa9\n"]  # the split really happened
    assert "".join(text) == "café\n"


async def test_non_zero_exit_code_is_reported(runtime: Runtime, workdir: Path) -> None:
    result = await run(runtime, spec(["/bin/sh", "-c", "echo oops >&2; exit 3"]), workdir)

    assert result.status.exit_code == 3
    assert result.status.reason is None
    assert result.output == [("stderr", b"oops\n")]


async def test_death_by_a_foreign_signal_names_it(runtime: Runtime, workdir: Path) -> None:
    if runtime.tier is Tier.OCI:
        # No init runs in the container: the program is PID 1 of its namespace, which the
        # kernel shields from signals it has no handler for, its own included.
        pytest.skip("the program is PID 1 of its PID namespace and cannot be signalled so")
    result = await run(runtime, spec(["/bin/sh", "-c", "kill -TERM $$"]), workdir)

    assert result.status.exit_code == -15
    assert result.status.reason == "killed:SIGTERM"


async def test_timeout_kills_and_reports_timeout(runtime: Runtime, workdir: Path) -> None:
    result = await run(runtime, spec(["sleep", "30"], timeout_s=0.2), workdir)

    assert result.status.reason == "timeout"
    assert result.status.exit_code == -9
    assert 200 <= result.status.usage.wall_ms < 10_000


async def test_kill_takes_the_whole_tree_down(runtime: Runtime, workdir: Path) -> None:
    code = (
        CHILD
        + """
import time
sleeper()
print("started", flush=True)
time.sleep(30)
"""
    )
    me = tag()
    handle = await runtime.start(spec([PY, "-c", code, me]), workdir)
    async with asyncio.timeout(20):
        output = handle.output()
        assert await anext(output) == ("stdout", b"started\n")
        found = pids_with(f"{me}-child")
        if not found and runtime.tier in (Tier.GVISOR, Tier.MICROVM):
            handle.kill()
            pytest.skip("the sandbox's processes live in its own kernel: none to watch here")
        (grandchild,) = found
        pidfd = os.pidfd_open(grandchild)
        try:
            handle.kill()
            async for _ in output:
                pass
            status = await handle.wait()
            # A pidfd turns readable when its process has ended.
            await asyncio.to_thread(select.select, [pidfd], [], [], 10)
            assert select.select([pidfd], [], [], 0)[0] == [pidfd]
        finally:
            os.close(pidfd)

    assert status.reason == "cancelled"

    def reaped() -> bool:
        reap_orphans()  # had its zombie been re-parented to us, it must not linger
        return gone(f"/proc/{grandchild}")

    # Ended, it is a zombie until its parent reaps it: in a container, the container's
    # init, itself being killed, reaps it a moment after the pidfd turned readable.
    eventually(reaped, timeout=10, what=f"process {grandchild} reaped")


async def test_exit_kills_what_is_left_of_the_group(runtime: Runtime, workdir: Path) -> None:
    # The child keeps no pipe open, so only the kill after exit can end it.
    code = (
        CHILD
        + """
sleeper(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""
    )
    me = tag()

    result = await run(runtime, spec([PY, "-c", code, me]), workdir)

    assert result.status.exit_code == 0, result.text("stderr")
    for pid in pids_with(f"{me}-child"):
        assert await wait_ended(pid)


async def test_an_escaped_process_cannot_hold_back_the_exit(
    runtime: Runtime, workdir: Path
) -> None:
    # A new session leaves the group (and escapes the kill) but keeps stdout open.
    code = f"""
import os, sys
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    os.set_inheritable(ready_w, True)
    argv = [sys.executable, "-c", {SLEEPER!r}, str(ready_w), sys.argv[1] + "-child"]
    os.execv(sys.executable, argv)
os.close(ready_w)
os.read(ready_r, 1)  # EOF once the child runs and closed it
print("escaped", flush=True)
"""
    me = tag()

    result = await run(runtime, spec([PY, "-c", code, me]), workdir)

    for pid in pids_with(f"{me}-child"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        assert await wait_ended(pid)
    assert result.status.exit_code == 0
    assert result.text("stdout") == "escaped\n"


async def test_work_dir_holds_the_source_and_is_removed_after_exit(
    runtime: Runtime, workdir: Path
) -> None:
    source = '#!/bin/sh\necho "from source in $(pwd) at $HOME"\nls\n'
    s = spec(["./main.sh"], source=source, source_name="main.sh")

    result = await run(runtime, s, workdir)

    assert result.status.exit_code == 0, result.text("stderr")
    home = result.text("stdout").split(" at ")[1].splitlines()[0]
    assert result.text("stdout") == f"from source in {home} at {home}\nargs.json\nmain.sh\n"
    assert gone(workdir)


async def test_a_source_without_shebang_is_not_executable(runtime: Runtime, workdir: Path) -> None:
    # Python's stat rather than coreutils': gVisor before 2023 fails the statx calls of
    # the latter with EINVAL.
    code = "import os; print(format(os.stat('prog.py').st_mode & 0o7777, 'o'))"
    s = spec([PY, "-c", code], source="print(1)\n", source_name="prog.py")

    result = await run(runtime, s, workdir)

    mode = int(result.text("stdout"), 8)
    assert not mode & (stat.S_IXUSR | stat.S_IRWXG | stat.S_IRWXO)


async def test_result_is_the_last_json_line_on_fd_3(runtime: Runtime, workdir: Path) -> None:
    code = """
import os
for line in [b'{"a": 1}\\n', b'[2, "two"]\\n', b'not json\\n', b'\\n', b'{"torn": ']:
    os.write(3, line)
"""
    result = await run(runtime, spec([PY, "-c", code]), workdir)

    assert result.status.result == [2, "two"]


async def test_a_result_too_deep_to_parse_is_reported_as_too_deep(
    runtime: Runtime, workdir: Path
) -> None:
    code = """
import os
with os.fdopen(3, "wb") as f:
    f.write(b"[" * 100000 + b"]" * 100000 + b"\\n")
"""

    result = await run(runtime, spec([PY, "-c", code]), workdir)

    assert result.status.exit_code == 0
    assert not json_depth_within(result.status.result)
    report = Exited.report(
        id="ex_1",
        attempt=1,
        exit_code=0,
        reason=None,
        result=result.status.result,
        chunks=0,
        usage=result.status.usage,
    )
    assert (report.reason, report.result) == (RESULT_INVALID, None)


async def test_result_is_null_without_fd_3_output(runtime: Runtime, workdir: Path) -> None:
    result = await run(runtime, spec(["/bin/sh", "-c", "echo 1 >&3"]), workdir)

    assert result.status.result == 1
    result = await run(runtime, spec(["/bin/true"]), workdir)
    assert result.status.result is None


async def test_a_missing_program_is_spawn_failed_with_a_reason(
    runtime: Runtime, workdir: Path
) -> None:
    result = await run(runtime, spec(["treadle-no-such-program", "x"]), workdir)

    assert result.status.exit_code is None
    assert result.status.reason == "spawn_failed"
    assert "treadle-no-such-program" in result.text("stderr")
    assert "not found" in result.text("stderr")
    assert gone(workdir)


async def test_a_program_that_cannot_be_executed_is_spawn_failed(
    runtime: Runtime, workdir: Path
) -> None:
    s = spec(["./data"], source="just text\n", source_name="data")  # mode 0600

    result = await run(runtime, s, workdir)

    assert result.status.reason == "spawn_failed"
    assert "Permission denied" in result.text("stderr")


async def test_the_program_gets_no_fd_but_stdio_and_the_result_pipe(
    runtime: Runtime, workdir: Path
) -> None:
    code = """
import os
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
print(*[fd for fd in range(1024) if is_open(fd)])
"""
    result = await run(runtime, spec([PY, "-c", code]), workdir)

    assert result.text("stdout") == "0 1 2 3\n"


async def test_large_output_arrives_complete(runtime: Runtime, workdir: Path) -> None:
    code = "import sys\nfor i in range(20000): sys.stdout.write(f'{i:07d}' * 12 + '\\n')"

    result = await run(runtime, spec([PY, "-c", code]), workdir)

    lines = result.text("stdout").splitlines()
    assert lines == [f"{i:07d}" * 12 for i in range(20000)]
    assert all(len(data) <= 64 * 1024 for _, data in result.output)
