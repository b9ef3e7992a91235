"""Helpers for the suites that run programs through isolation runtimes.

What runs in a sandbox sees neither the test's files nor its pids, and the test does not see
the sandbox's pids. So the test finds the processes of a program by an argument that only they
carry (`tag()`), in its own /proc, and reaches into a program's work dir through
`/proc/<pid>/cwd`, which works whatever mount namespace the program is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.microvm.runtime import MicrovmExecution
from treadle.shuttle.runtimes import (
    ExitStatus,
    OciRuntime,
    Runtime,
    RuntimeHandle,
    Stream,
    available_runtimes,
)
from treadle.shuttle.settings import ShuttleSettings

PY = "/usr/bin/python3"  # not the PATH `python3`, which may be a slow pyenv shim


def shuttle_settings(home: Path, **overrides: Any) -> ShuttleSettings:
    fields: dict[str, Any] = {
        "weaver_url": "http://127.0.0.1:9",
        "home": home,
        "allow_process_runtime": True,
        "token": None,
    }
    fields.update(overrides)
    return ShuttleSettings(**fields)


def spec(argv: list[str], **overrides: Any) -> AssignSpec:
    fields: dict[str, Any] = {
        "id": "ex_1",
        "attempt": 1,
        "tenant_id": "tn_1",
        "function": "fn",
        "version": 1,
        "argv": argv,
        "timeout_s": 30,
        "resources": Resources(),
        "isolation": Tier.PROCESS,
    }
    fields.update(overrides)
    return AssignSpec(**fields)


# The tier each installed tool should bring; `scripts/test` installs them all.
_EXPECTED = (
    ("bwrap", Tier.NAMESPACE, None),
    ("crun", Tier.OCI, "crun"),
    ("runc", Tier.OCI, "runc"),
    ("runsc", Tier.GVISOR, None),
    ("qemu-system-x86_64", Tier.MICROVM, None),
)


def runtime_params(*, process: bool = True, microvm: bool = False) -> list[Any]:
    """pytest params `(tier, settings overrides)` for every runtime this host offers: the
    oci tier once per program behind it (crun and runc), the others once. A tier whose tool
    is installed but which does not work here is a skipped param naming why, and in CI (where
    everything is installed) an error: it must never go untested unnoticed. `microvm`: the
    microvm tier too, for the suites it passes (the runtime and sandbox contracts; not yet
    the escape suite)."""
    params: list[Any] = []
    if process:
        params.append(pytest.param((Tier.PROCESS, {}), id="process"))
    for program, tier, tool in _EXPECTED:
        if tier == Tier.MICROVM and not microvm:
            continue
        overrides: dict[str, Any] = {} if tool is None else {"oci_tool": tool}
        if tier == Tier.MICROVM:
            overrides["microvm"] = True
        name = str(tier) if tool is None else f"{tier}-{tool}"
        if shutil.which(program) is None:
            continue
        offered, why = _offered(tier, overrides)
        slow = [pytest.mark.microvm] if tier == Tier.MICROVM else []
        if offered:
            params.append(pytest.param((tier, overrides), id=name, marks=slow))
            continue
        if os.environ.get("CI"):
            raise RuntimeError(f"{program} is installed but the {name} tier does not work: {why}")
        params.append(pytest.param((tier, overrides), id=name, marks=pytest.mark.skip(why)))
    return params


def _offered(tier: Tier, overrides: dict[str, Any]) -> tuple[bool, str]:
    """Whether the host offers `tier`, and else what the runtimes logged about it."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("treadle.shuttle.runtimes")
    logger.addHandler(handler)
    try:
        found = available_runtimes(shuttle_settings(Path("/nonexistent"), **overrides))
    finally:
        logger.removeHandler(handler)
    return tier in found, "; ".join(seen) or f"{tier} not offered"


def make_runtime(param: tuple[Tier, dict[str, Any]], home: Path, **overrides: Any) -> Runtime:
    tier, extra = param
    return available_runtimes(shuttle_settings(home, **extra, **overrides))[tier]


def tag() -> str:
    """An argument to give a program so that its processes can be found (`pids_with`)."""
    return f"treadle-test-{uuid.uuid4().hex}"


def pids_with(argument: str) -> list[int]:
    """The pids, in this process's PID namespace, of processes with `argument` in argv."""
    wanted = argument.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            found.append(int(name))
    return found


async def wait_ended(pid: int) -> bool:
    """Whether `pid` ends within 10 s (a pidfd turns readable when its process ends)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = await asyncio.to_thread(select.select, [pidfd], [], [], 10)
        return bool(ready)
    finally:
        os.close(pidfd)


# The program side of a gate: the n-th `wait()` returns once the file `gate.n` exists in its
# work dir, which `Gate.release()` creates. Files rather than a FIFO: in gVisor a FIFO lives in
# the sandbox's kernel, while files reach the host's work dir.
GATED = """
import json, os, sys, time
_gates = 0
def wait():
    global _gates
    _gates += 1
    while not os.path.exists(f"gate.{_gates}"):
        time.sleep(0.005)
"""


class Gate:
    """Steps a GATED program run with `[..., gate.tag]` in its argv. `locate` finds, by an
    argument of its program, the host work dir of a program whose processes are not host
    processes (gVisor's); see `container_workdir`."""

    def __init__(self, locate: Callable[[str], Path | None] | None = None) -> None:
        self.tag = tag()
        self._locate = locate
        self._dir: int | None = None
        self._released = 0
        self._vm: MicrovmExecution | None = None
        self._touching: list[asyncio.Task[object]] = []

    def attach(self, handle: RuntimeHandle) -> None:
        """The handle of the gated program: where it runs in a VM, the gate is reached
        through the VM's agent (nothing of a guest's is on the host)."""
        if isinstance(handle, MicrovmExecution):
            self._vm = handle

    def release(self) -> None:
        if self._vm is not None:
            self._released += 1
            link, home = self._vm.sandbox.link, self._vm.home
            touch = link.exec(["touch", f"gate.{self._released}"], cwd=home)
            self._touching.append(asyncio.ensure_future(touch))
            return
        if self._dir is None:
            self._dir = self._open()
        self._released += 1
        # Through a descriptor of the directory: it holds even once the program has gone.
        # As the directory's owner: where the sandbox's ids map to a host uid of its own, the
        # sandbox's file system has no id for this process's (EOVERFLOW).
        owner = os.fstat(self._dir)
        if owner.st_uid == os.geteuid():
            _touch(self._dir, f"gate.{self._released}")
            return
        child = os.fork()
        if child == 0:
            try:
                os.setresgid(owner.st_gid, owner.st_gid, owner.st_gid)
                os.setresuid(owner.st_uid, owner.st_uid, owner.st_uid)
                _touch(self._dir, f"gate.{self._released}")
            finally:
                os._exit(0)
        assert os.waitpid(child, 0)[1] == 0

    def close(self) -> None:
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def _open(self) -> int:
        for pid in pids_with(self.tag):
            # Other processes carry the tag too (a sandbox tool's own); only the program's
            # work dir holds its arguments file.
            with contextlib.suppress(OSError):
                fd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY)
                if os.path.exists(f"/proc/self/fd/{fd}/args.json"):
                    return fd
                os.close(fd)
        found = self._locate(self.tag) if self._locate is not None else None
        if found is not None:
            return os.open(found, os.O_RDONLY | os.O_DIRECTORY)
        if not pids_with(self.tag) and self._locate is None:
            # gVisor: the program's processes live in the sandbox's kernel, not the host's.
            pytest.skip("the program's processes are not host processes: no gate to reach")
        raise AssertionError("the program's gate is nowhere to be found")


def _touch(directory: int, name: str) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=directory))


def container_workdir(runtime: Runtime) -> Callable[[str], Path | None] | None:
    """For an OCI runtime: finds the work dir of the container whose program has an argument,
    through the bundles' configs."""
    if not isinstance(runtime, OciRuntime):
        return None

    def locate(argument: str) -> Path | None:
        for config in runtime.bundles_dir.glob("*/config.json"):
            with contextlib.suppress(OSError, ValueError):
                if argument in json.loads(config.read_text())["process"]["args"]:
                    return runtime.work_root / config.parent.name
        return None

    return locate


@dataclass
class Run:
    output: list[tuple[Stream, bytes]]
    status: ExitStatus

    def text(self, stream: str) -> str:
        return b"".join(data for s, data in self.output if s == stream).decode()


async def run(runtime: Runtime, s: AssignSpec, workdir: Path) -> Run:
    async with asyncio.timeout(20):
        handle = await runtime.start(s, workdir)
        output = [item async for item in handle.output()]
        return Run(output, await handle.wait())


@contextlib.asynccontextmanager
async def started(runtime: Runtime, s: AssignSpec, workdir: Path) -> AsyncIterator[RuntimeHandle]:
    async with asyncio.timeout(20):
        handle = await runtime.start(s, workdir)
        try:
            yield handle
        finally:
            handle.kill()
            async for _ in handle.output():
                pass
            await handle.wait()
