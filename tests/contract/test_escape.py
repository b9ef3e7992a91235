"""What code in a sandbox must not be able to do, tried from inside, on every tier that claims
to isolate (all but `process`).

Each test attacks from one execution while a neighbour execution runs, and ends by checking
that the attack changed nothing for the others: the neighbour finishes normally, this process
(which plays Shuttle) still starts processes, and the runtime still runs a fresh execution.
The attacking programs report what they managed as JSON, so a failure shows what got through.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.runtimes import (
    GATED,
    PY,
    Gate,
    Run,
    container_workdir,
    make_runtime,
    pids_with,
    run,
    runtime_params,
    spec,
)
from treadle.domain.resources import Resources
from treadle.shuttle.oci.tools import ToolKind
from treadle.shuttle.runtimes import (
    NamespaceRuntime,
    OciRuntime,
    ProcessRuntime,
    Runtime,
    RuntimeHandle,
)
from treadle.shuttle.sandbox.policy import masked_in_proc
from treadle.shuttle.sandbox.seccomp import arch_for_machine

PIDS_MAX = 64


@pytest.fixture(params=runtime_params(process=False, microvm=True))
def runtime(request: pytest.FixtureRequest, home: Path) -> Runtime:
    return make_runtime(request.param, home, pids_max=PIDS_MAX)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.json").write_text('{"secret": "shuttle-secret"}')
    return home


@pytest.fixture
def workdir(home: Path) -> Path:
    return home / "work" / "ex_1-1"


def cgroup_limits(runtime: Runtime) -> bool:
    """Whether the runtime enforces limits with cgroups here (else with rlimits, which say
    less about why a program failed)."""
    limits = runtime.limits if isinstance(runtime, (NamespaceRuntime, OciRuntime)) else ""
    return limits.startswith("cgroup")


def counters_outlive_the_exit(runtime: Runtime) -> bool:
    """Whether the cgroup's counters can still be read once the program exited: crun and
    runsc remove the container's cgroup as it exits (runc keeps it until `delete`)."""
    return not isinstance(runtime, OciRuntime) or runtime.tool.kind is ToolKind.RUNC


@dataclass
class Neighbour:
    """Another execution, running (blocked on its gate) while the test attacks."""

    handle: RuntimeHandle
    gate: Gate
    workdir: Path

    @property
    def pids(self) -> list[int]:
        return pids_with(self.gate.tag)

    async def finish(self) -> None:
        """Let it run to its end, and check that it ended as it would have anyway."""
        self.gate.release()
        output = [item async for item in self.handle.output()]
        status = await self.handle.wait()
        assert output == [("stdout", b"done\n")]
        assert (status.exit_code, status.reason) == (0, None)


@pytest.fixture
async def neighbour(runtime: Runtime, home: Path) -> AsyncIterator[Neighbour]:
    code = (
        GATED
        + """
print("ready", flush=True)
wait()
print("done", flush=True)
"""
    )
    gate = Gate(container_workdir(runtime))
    workdir = home / "work" / "ex_2-1"
    s = spec([PY, "-c", code, gate.tag], id="ex_2", args={"secret": "neighbour-secret"})
    handle = await runtime.start(s, workdir)
    gate.attach(handle)
    try:
        assert await anext(handle.output()) == ("stdout", b"ready\n")
        yield Neighbour(handle, gate, workdir)
    finally:
        handle.kill()
        async for _ in handle.output():
            pass
        await handle.wait()
        gate.close()


async def attack(runtime: Runtime, workdir: Path, code: str, **overrides: Any) -> Run:
    return await run(runtime, spec([PY, "-c", code], **overrides), workdir)


def report(result: Run) -> dict[str, Any]:
    assert result.status.exit_code == 0, result.text("stderr")
    seen: dict[str, Any] = json.loads(result.text("stdout"))
    return seen


def on_host(paths: list[str]) -> list[str]:
    return [path for path in paths if os.path.lexists(path)]


async def assert_unharmed(runtime: Runtime, workdir: Path, neighbour: Neighbour) -> None:
    await neighbour.finish()
    true = await asyncio.create_subprocess_exec("/bin/true")
    assert await true.wait() == 0
    fresh = await run(runtime, spec(["/bin/echo", "ok"], id="ex_3"), workdir.parent / "ex_3-1")
    assert fresh.output == [("stdout", b"ok\n")]
    assert fresh.status.exit_code == 0


# The attacker's side: attempt(what, fn) records "ok", or the name of the error fn raised.
TRY = """
import ctypes, errno, json, os, socket, sys
seen = {}
def attempt(what, fn):
    try:
        fn()
        seen[what] = "ok"
    except OSError as exc:
        seen[what] = errno.errorcode.get(exc.errno, str(exc.errno))
def read(path):
    with open(path, "rb") as f:
        f.read()
def write(path):
    with open(path, "wb") as f:
        f.write(b"x")
libc = ctypes.CDLL(None, use_errno=True)
def checked(rc):
    if rc == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
"""


async def test_files_of_shuttle_and_of_a_neighbour_are_out_of_reach(
    runtime: Runtime, workdir: Path, home: Path, neighbour: Neighbour
) -> None:
    targets = [
        str(home / "node.json"),
        str(neighbour.workdir / "args.json"),
        *(f"/proc/{pid}/{leaf}" for pid in neighbour.pids for leaf in ("environ", "cmdline")),
        *(f"/proc/{pid}/root/work/args.json" for pid in neighbour.pids),
        *(f"/proc/{pid}/cwd/args.json" for pid in neighbour.pids),
        "/etc/shadow",
    ]
    code = (
        TRY
        + f"""
for path in {targets!r}:
    attempt(path, lambda: read(path))
seen["/"] = sorted(os.listdir("/"))
# What is under the host's top-level directories of data, where the sandbox has them: only
# empty mount points treadle made (a sandbox's `home`, as /home/user), nothing of the host.
seen["data"] = {{
    name: [entry for entry, _, files in os.walk("/" + name) if files or entry.count("/") > 3]
    for name in ("root", "home", "var", "srv", "opt", "mnt") if name in seen["/"]
}}
print(json.dumps(seen))
"""
    )

    result = await attack(runtime, workdir, code)

    seen = report(result)
    assert {path: seen[path] for path in targets if seen[path] == "ok"} == {}
    assert set(seen["data"]) <= {"home"}, seen["data"]
    assert seen["data"].get("home", []) == [], seen["data"]
    assert "secret" not in result.text("stdout") + result.text("stderr")
    await assert_unharmed(runtime, workdir, neighbour)


async def test_processes_outside_cannot_be_signalled_or_traced(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    targets = [os.getpid(), *neighbour.pids]
    code = (
        TRY
        + f"""
PTRACE_ATTACH = 16
for pid in {targets!r}:
    attempt(f"kill {{pid}}", lambda: os.kill(pid, 9))
    attempt(f"pidfd {{pid}}", lambda: os.close(os.pidfd_open(pid)))
    attempt(f"ptrace {{pid}}", lambda: checked(libc.ptrace(PTRACE_ATTACH, pid, None, None)))
# Tracing is refused as such, not only because the targets are out of sight.
child = os.fork()
if child == 0:
    os.read(os.open("/dev/null", os.O_RDONLY), 1)
    os._exit(0)
attempt("ptrace child", lambda: checked(libc.ptrace(PTRACE_ATTACH, child, None, None)))
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
attempt(
    "process_vm_readv child",
    lambda: checked(libc.process_vm_readv(child, iov, 1, iov, 1, 0)),
)
os.waitpid(child, 0)
print(json.dumps(seen))
"""
    )

    seen = report(await attack(runtime, workdir, code))

    for pid in targets:
        assert seen[f"kill {pid}"] == "ESRCH"
        # ENOSYS: gVisor has no pidfd_open at all.
        assert seen[f"pidfd {pid}"] in ("ESRCH", "ENOSYS")
        assert seen[f"ptrace {pid}"] in ("EPERM", "ESRCH")
    assert seen["ptrace child"] == "EPERM"
    assert seen["process_vm_readv child"] == "EPERM"
    await assert_unharmed(runtime, workdir, neighbour)


async def test_namespaces_and_mounts_cannot_be_changed(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    code = (
        TRY
        + """
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000
MS_REMOUNT, MS_BIND = 32, 4096
attempt("unshare user", lambda: checked(libc.unshare(CLONE_NEWUSER)))
attempt("unshare mount", lambda: checked(libc.unshare(CLONE_NEWNS)))
attempt("unshare net", lambda: checked(libc.unshare(CLONE_NEWNET)))
attempt("setns", lambda: checked(libc.setns(os.open("/proc/1/ns/mnt", os.O_RDONLY), 0)))
attempt("remount /usr", lambda: checked(
    libc.mount(None, b"/usr", None, MS_REMOUNT | MS_BIND, None)))
attempt("mount tmpfs", lambda: checked(libc.mount(b"x", b"/work", b"tmpfs", 0, None)))
attempt("umount /usr", lambda: checked(libc.umount2(b"/usr", 2)))
print(json.dumps(seen))
"""
    )

    seen = report(await attack(runtime, workdir, code))

    # gVisor shows no namespace files in /proc, so there is nothing to join; a microVM's
    # PID 1 is its agent, which its user may not look into.
    assert seen.pop("setns") in ("EPERM", "ENOENT", "EACCES")
    assert seen == {
        "unshare user": "EPERM",
        "unshare mount": "EPERM",
        "unshare net": "EPERM",
        "remount /usr": "EPERM",
        "mount tmpfs": "EPERM",
        "umount /usr": "EPERM",
    }
    await assert_unharmed(runtime, workdir, neighbour)


async def test_no_network_reaches_the_host(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            TRY
            + f"""
attempt("connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=5).close())
print(json.dumps(seen))
"""
        )

        seen = report(await attack(runtime, workdir, code))

        assert seen["connect"] == "ECONNREFUSED"  # the sandbox's own, empty loopback
        with pytest.raises(BlockingIOError):
            listener.accept()
    await assert_unharmed(runtime, workdir, neighbour)


async def test_nothing_outside_its_own_dirs_can_be_written(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    name = f"treadle-escape-{uuid.uuid4().hex}"
    outside = [
        f"/usr/{name}",
        f"/usr/bin/{name}",
        f"/etc/{name}",
        f"/{name}",
        f"/dev/{name}",
        f"/proc/{name}",
    ]
    code = (
        TRY
        + f"""
for path in {outside!r}:
    attempt(path, lambda: write(path))
attempt("/tmp", lambda: write("/tmp/{name}"))
attempt("work", lambda: write("{name}"))
print(json.dumps(seen))
"""
    )

    seen = report(await attack(runtime, workdir, code))

    assert {path: seen[path] for path in outside if seen[path] == "ok"} == {}
    # Its /tmp and work dir are its own: writable, and nothing of them shows on the host.
    assert seen["/tmp"] == seen["work"] == "ok"
    assert not on_host([*outside, f"/tmp/{name}"])
    await assert_unharmed(runtime, workdir, neighbour)


async def test_a_fork_bomb_is_contained(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    code = """
import os, sys, time
forked = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        print(forked, exc.errno, flush=True)
        sys.exit(1)
    if pid == 0:
        while True:  # every child forks on, as long as it can
            try:
                os.fork()
            except OSError:
                time.sleep(60)
    forked += 1
"""

    result = await attack(runtime, workdir, code)

    forked, error = map(int, result.text("stdout").split())
    assert error == errno.EAGAIN
    assert forked < PIDS_MAX
    assert result.status.exit_code == 1
    if cgroup_limits(runtime) and counters_outlive_the_exit(runtime):
        assert result.status.reason == "pids_limit"
    await assert_unharmed(runtime, workdir, neighbour)


async def test_memory_past_the_limit_is_refused(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    code = "hog = b'x' * (512 << 20)\nprint('allocated')"

    result = await attack(runtime, workdir, code, resources=Resources(memory_mib=64))

    assert "allocated" not in result.text("stdout")
    if cgroup_limits(runtime):
        assert result.status.reason == "oom_killed"
        assert result.status.exit_code == -9
        rss = result.status.usage.max_rss_kib
        if counters_outlive_the_exit(runtime):
            assert rss is not None
        assert rss is None or rss <= 64 * 1024
    else:  # the address space limit: the allocation fails
        assert "MemoryError" in result.text("stderr")
    await assert_unharmed(runtime, workdir, neighbour)


async def test_disk_writes_stop_at_the_quota(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    code = """
import json, os
seen = {}
for where in ("/tmp", "/dev/shm", os.getcwd()):
    written = 0
    try:
        with open(os.path.join(where, "fill"), "wb") as f:
            while True:
                written += f.write(b"x" * (1 << 20))
                f.flush()
    except OSError as exc:
        seen[where] = [written, exc.errno]
    os.unlink(os.path.join(where, "fill"))
    seen[where + "/many"] = 0
    try:  # small files, in case only file sizes are bounded
        while True:
            with open(os.path.join(where, f"f{seen[where + '/many']}"), "wb") as f:
                f.write(b"x" * (64 << 10))
            seen[where + "/many"] += 1
    except OSError as exc:
        seen[where + "/many"] = [seen[where + "/many"] * (64 << 10), exc.errno]
print(json.dumps(seen))
"""

    seen = report(await attack(runtime, workdir, code, resources=Resources(disk_mib=8)))

    assert len(seen) == 6
    for written, error in seen.values():
        assert error == errno.ENOSPC
        assert written <= 8 << 20
    await assert_unharmed(runtime, workdir, neighbour)


# A call of every denied family, with arguments that make it fail harmlessly (or succeed
# without effect) when nothing filters it: a bad fd, a NULL pointer, a bad magic number. Only
# the seccomp policy answers EPERM to all of them, which the process tier shows: there, most
# answer something else (`test_the_probes_tell_a_filter_from_no_filter`).
SYSCALL_PROBES: dict[str, tuple[int, ...]] = {
    "io_uring_setup": (1, -1),  # the params pointer is filled in below
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),
    "io_uring_register": (-1, 0, 0, 0),
    "ptrace": (16, 0x3FFFFFF0, 0, 0),  # PTRACE_ATTACH to a pid that does not exist
    "process_vm_readv": (0, 0, 0, 0, 0, 0),  # pid filled in below
    "process_vm_writev": (0, 0, 0, 0, 0, 0),
    "kcmp": (0, 0, 0, 0, 0),
    "pidfd_getfd": (-1, 0, 0),
    "mount": (0, 0, 0, 0, 0),
    "umount2": (0, 0),
    "pivot_root": (0, 0),
    "open_tree": (-1, 0, 0),
    "move_mount": (-1, 0, -1, 0, 0),
    "fsopen": (0, 0),
    "fsconfig": (-1, 0, 0, 0, 0),
    "fsmount": (-1, 0, 0),
    "fspick": (-1, 0, 0),
    "mount_setattr": (-1, 0, 0, 0, 0),
    "kexec_load": (0, 0, 0, 0xDEAD0000),
    "kexec_file_load": (-1, -1, 0, 0, 0xDEAD0000),
    "init_module": (0, 0, 0),
    "finit_module": (-1, 0, 0),
    "delete_module": (0, 0),
    "bpf": (9999, 0, 0),
    "perf_event_open": (0, 0, -1, -1, 0),
    "reboot": (0, 0, 0, 0),  # wrong magic numbers
    "swapon": (0, 0),
    "swapoff": (0,),
    "syslog": (10, 0, 0),  # SYSLOG_ACTION_SIZE_BUFFER
    "name_to_handle_at": (-100, 0, 0, 0, 0),
    "open_by_handle_at": (-1, 0, 0),
    "keyctl": (0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": (0, 0, 0, 0, 0),
    "request_key": (0, 0, 0, 0),
    "userfaultfd": (1,),  # UFFD_USER_MODE_ONLY
    "unshare": (0x10000000,),  # CLONE_NEWUSER
    "setns": (-1, 0),
}


def refusals(runtime: Runtime, under_gvisor: str) -> set[str]:
    """The answers that mean "refused": EPERM from the seccomp policy, and under gVisor also
    the answer of its own kernel, which may refuse first."""
    if isinstance(runtime, OciRuntime) and runtime.tool.kind is ToolKind.RUNSC:
        return {"EPERM", under_gvisor}
    return {"EPERM"}


def probe_code() -> str:
    arch = arch_for_machine()
    assert arch is not None
    numbers = {name: arch.numbers[name] for name in SYSCALL_PROBES}
    return (
        TRY
        + f"""
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
probes = {SYSCALL_PROBES!r}
probes["io_uring_setup"] = (1, ctypes.addressof(params))
probes["process_vm_readv"] = (os.getpid(), 0, 0, 0, 0, 0)
probes["process_vm_writev"] = (os.getpid(), 0, 0, 0, 0, 0)
probes["kcmp"] = (os.getpid(), os.getpid(), 0, 0, 0)
numbers = {numbers!r}
for name, args in probes.items():
    attempt(name, lambda: checked(libc.syscall(
        ctypes.c_long(numbers[name]), *(ctypes.c_long(a) for a in args))))
print(json.dumps(seen))
"""
    )


async def test_the_probes_tell_a_filter_from_no_filter(tmp_path: Path) -> None:
    unfiltered = report(await attack(ProcessRuntime(), tmp_path / "ex_1-1", probe_code()))

    assert set(unfiltered) == set(SYSCALL_PROBES)
    # Where nothing filters, io_uring_enter reaches the kernel, which looks at the fd first;
    # pidfd_getfd and setns too.
    for name in ("io_uring_enter", "pidfd_getfd", "setns"):
        assert unfiltered[name] == "EBADF", name
    telling = [name for name, answer in unfiltered.items() if answer != "EPERM"]
    assert len(telling) >= len(SYSCALL_PROBES) // 2, unfiltered


async def test_every_denied_family_is_refused(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    seen = report(await attack(runtime, workdir, probe_code()))

    refused = refusals(runtime, "ENOSYS")  # on gVisor: calls its kernel does not have at all
    assert {name: answer for name, answer in seen.items() if answer not in refused} == {}
    await assert_unharmed(runtime, workdir, neighbour)


def host_ids(pid: int) -> tuple[set[int], set[int]]:
    """The (real, effective, saved, fs) uids, and the gids with the supplementary groups, of
    a host process."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    gids = fields["Gid"].split() + fields["Groups"].split()
    return {int(u) for u in fields["Uid"].split()}, {int(g) for g in gids}


async def test_programs_never_run_as_a_privileged_host_user_and_never_share_one(
    runtime: Runtime, home: Path, neighbour: Neighbour
) -> None:
    if not neighbour.pids:
        # gVisor's and a microVM's: the host runs the VMM, whose ids the sandbox suite checks.
        pytest.skip("the program's processes live in the sandbox's own kernel")
    gate = Gate(container_workdir(runtime))
    s = spec([PY, "-c", GATED + "print('ready', flush=True)\nwait()", gate.tag], id="ex_4")
    second = await runtime.start(s, home / "work" / "ex_4-1")
    try:
        assert await anext(second.output()) == ("stdout", b"ready\n")
        first_ids = [host_ids(pid) for pid in neighbour.pids]
        second_ids = [host_ids(pid) for pid in pids_with(gate.tag)]
    finally:
        second.kill()
        async for _ in second.output():
            pass
        await second.wait()
        gate.close()

    if os.geteuid() == 0:
        # Shuttle is root: its sandboxes are not, not even without capabilities.
        for uids, gids in first_ids + second_ids:
            assert 0 not in uids and 0 not in gids, (uids, gids)
        # Each workload its own host ids: no rlimit or signal is shared between two.
        first_uids = set().union(*(uids for uids, _ in first_ids))
        second_uids = set().union(*(uids for uids, _ in second_ids))
        assert not first_uids & second_uids
    else:
        for uids, _ in first_ids + second_ids:
            assert uids == {os.getuid()}  # the only uid an unprivileged Shuttle can map
    await neighbour.finish()


def present(paths: list[str]) -> list[str]:
    return [path for path in paths if os.path.exists(path)]


async def test_host_wide_kernel_state_is_masked(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    masked = present(masked_in_proc())
    code = (
        TRY
        + f"""
for path in {masked!r}:
    if os.path.isdir(path):
        seen[path] = os.listdir(path)
        continue
    try:
        with open(path, "rb") as f:
            seen[path] = len(f.read(4096))
    except OSError as exc:
        seen[path] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(seen))
"""
    )

    seen = report(await attack(runtime, workdir, code))

    # Empty, unreadable, or not there at all (gVisor's own /proc has none of the host's).
    hidden = (0, [], "ENOENT", "EACCES")
    assert {path: what for path, what in seen.items() if what not in hidden} == {}
    assert masked == [] or set(seen) == set(masked)
    await assert_unharmed(runtime, workdir, neighbour)


async def test_a_crash_feeds_no_core_dump_to_the_host(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    code = (
        TRY
        + """
import resource
seen["core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
try:
    resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))
    seen["raise"] = "ok"
except (OSError, ValueError) as exc:  # Python says ValueError for the kernel's EPERM
    seen["raise"] = str(exc)
print(json.dumps(seen))
"""
    )

    seen = report(await attack(runtime, workdir, code))

    assert seen["core"] == [0, 0]
    assert seen["raise"] != "ok"
    await assert_unharmed(runtime, workdir, neighbour)


async def test_no_vsock_or_other_unneeded_socket_family(
    runtime: Runtime, workdir: Path, neighbour: Neighbour
) -> None:
    # vsock is the machine's channel to its hypervisor: no network namespace confines it,
    # so a sandbox without network could otherwise listen there (nothing is sent here).
    code = (
        TRY
        + """
for name, family in (("vsock", 40), ("alg", 38)):
    attempt(name, lambda: socket.socket(family, socket.SOCK_STREAM if family == 40 else 5).close())
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
print(json.dumps(seen))
"""
    )

    seen = report(await attack(runtime, workdir, code))

    refused = refusals(runtime, "EAFNOSUPPORT")  # gVisor's kernel has neither family
    assert seen["vsock"] in refused
    assert seen["alg"] in refused
    assert seen["unix"] == "ok"
    await assert_unharmed(runtime, workdir, neighbour)
