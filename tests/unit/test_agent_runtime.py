"""The guest agent's Python runtime (`treadle.shuttle.live.agent_runtime`): built once per
node under its state, found again without a rebuild, atomic when Shuttles race, and able to
run the agent on its own files alone."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from treadle.shuttle.live import agent_runtime
from treadle.shuttle.live.agent_runtime import AgentRuntime
from treadle.shuttle.live.box import AGENT_SOURCE


def _run(runtime: AgentRuntime, code: str) -> subprocess.CompletedProcess[bytes]:
    argv = [*runtime.argv(str(runtime.path)), "-I", "-S", "-c", code]
    return subprocess.run(argv, env={}, capture_output=True, timeout=30, check=False)


def test_a_cache_hit_returns_the_same_runtime_without_rebuilding(tmp_path: Path) -> None:
    first = agent_runtime.prepare(tmp_path)
    assert first.built
    assert first.path.parent == tmp_path
    binary = first.path / "bin" / first.interpreter
    made = (first.path.stat().st_ino, binary.stat().st_ino, binary.stat().st_mtime_ns)

    again = agent_runtime.prepare(tmp_path)
    assert not again.built
    assert (again.path, again.size_bytes, again.files) == (
        first.path,
        first.size_bytes,
        first.files,
    )
    assert (again.path.stat().st_ino, binary.stat().st_ino, binary.stat().st_mtime_ns) == made
    assert [p.name for p in tmp_path.iterdir() if p.name != "tmp"] == [first.path.name]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_ensure_remembers_the_runtime_for_the_process(tmp_path: Path) -> None:
    first = agent_runtime.ensure(tmp_path)
    assert agent_runtime.ensure(tmp_path) is first


def test_the_runtime_runs_the_agent_on_its_own_files(tmp_path: Path) -> None:
    runtime = agent_runtime.prepare(tmp_path)
    assert sorted(p.name for p in runtime.path.iterdir()) == ["bin", "lib", "libexec", "tools"]
    assert runtime.size_bytes < 64 * 1024 * 1024
    # Python finds its standard library in the runtime, and nothing outside it.
    found = _run(runtime, "import sys, json; print(json.dumps([sys.prefix, *sys.path]))")
    assert found.returncode == 0, found.stderr
    paths = json.loads(found.stdout)
    assert paths[0] == str(runtime.path)
    assert all(p.startswith(f"{runtime.path}/") for p in paths[1:]), paths
    # Its shared objects are the runtime's, the loader included (the host's locale data,
    # where there is one, is no code).
    maps = _run(runtime, "import pty, shutil, socket; print(open('/proc/self/maps').read())")
    assert maps.returncode == 0, maps.stderr
    mapped = {line.split()[-1] for line in maps.stdout.decode().splitlines() if "/" in line}
    code = {
        m
        for m in mapped
        if ".so" in os.path.basename(m) or m.endswith(f"/bin/{runtime.interpreter}")
    }
    assert {m for m in code if not m.startswith(f"{runtime.path}/")} == set()
    assert f"{runtime.path}/lib/libc.so.6" in mapped

    # The agent itself: its first frame says it is ready.
    argv = [*runtime.argv(str(runtime.path)), "-I", "-S", "-c", AGENT_SOURCE]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={"HOME": str(tmp_path)}
    ) as agent:
        try:
            assert agent.stdout is not None
            head_len, payload_len = struct.unpack(">II", agent.stdout.read(8))
            ready = json.loads(agent.stdout.read(head_len))
            assert (ready["ev"], payload_len) == ("ready", 0)
        finally:
            agent.kill()


def test_shuttles_racing_to_build_share_one_runtime(tmp_path: Path) -> None:
    builders = 4
    barrier = threading.Barrier(builders)

    def build(_: int) -> AgentRuntime:
        barrier.wait()
        return agent_runtime.prepare(tmp_path)

    with ThreadPoolExecutor(builders) as pool:
        results = list(pool.map(build, range(builders)))
    assert len({r.path for r in results}) == 1
    assert sum(r.built for r in results) >= 1
    assert list((tmp_path / "tmp").iterdir()) == []
    assert _run(results[0], "print('ok')").stdout == b"ok\n"


def test_the_runtime_is_readable_by_anyone(tmp_path: Path) -> None:
    # The sandboxes' users, not Shuttle's, open and run it.
    runtime = agent_runtime.prepare(tmp_path)
    for dirpath, dirnames, filenames in os.walk(runtime.path):
        for name in dirnames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o755
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                assert os.stat(path).st_mode & 0o777 in (0o644, 0o755), path


def test_elf_reader_names_the_loader_and_sonames(tmp_path: Path) -> None:
    runtime = agent_runtime.prepare(tmp_path)
    program = agent_runtime._elf(str(runtime.path / "bin" / runtime.interpreter))
    assert program is not None and program.interp is not None
    assert os.path.basename(program.interp) == runtime.loader
    for library in (runtime.path / "lib").glob("*.so*"):
        found = agent_runtime._elf(str(library))
        assert found is not None and found.soname == library.name, library
    assert agent_runtime._elf(__file__) is None
