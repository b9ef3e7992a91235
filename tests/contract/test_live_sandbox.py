"""Long-lived sandboxes on a node (`treadle.shuttle.live`), on every tier that has them:
processes started one after another in one boundary, their streams, stdin, PTY and signals,
files both ways, per-stream flow control, pause/resume and stop."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contract.test_escape import SYSCALL_PROBES, probe_code
from support.runtimes import make_runtime, runtime_params
from treadle.domain.resources import Resources, Tier
from treadle.shuttle.live import box
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.live.link import GuestError, GuestProcess, LinkBroken
from treadle.shuttle.microvm.runtime import MicrovmRuntime
from treadle.shuttle.runtimes.process import ProcessRuntime
from treadle.shuttle.sandbox.policy import ROOT_CAPABILITIES

PARAMS = runtime_params(microvm=True)
HOST_PASSWD = Path("/etc/passwd").read_bytes()
PY_IN = "python3"  # the sandbox's own, on its PATH


@pytest.fixture(params=PARAMS)
def tier(request: pytest.FixtureRequest) -> tuple[Tier, dict[str, Any]]:
    param: tuple[Tier, dict[str, Any]] = request.param
    return param


@pytest.fixture
async def sandbox(tier: tuple[Tier, dict[str, Any]], tmp_path: Path) -> AsyncIterator[LiveSandbox]:
    started = await start(tier, tmp_path)
    try:
        yield started
    finally:
        await started.stop(grace_s=1)


async def start(tier: tuple[Tier, dict[str, Any]], root: Path, **spec: Any) -> LiveSandbox:
    runtime = make_runtime(tier, root)
    assert isinstance(runtime, (ProcessRuntime, MicrovmRuntime))
    launcher = runtime.launcher
    fields: dict[str, Any] = {
        "id": "sbx_1",
        "incarnation": 1,
        "tenant_id": "tn_1",
        "resources": Resources(cpu_millicores=1000, memory_mib=256),
        "isolation": tier[0],
        "env": {"GREETING": "hello"},
        "python": "/usr/bin/python3",
    }
    fields.update(spec)
    return await LiveSandbox.start(launcher, SandboxSpec(**fields), root / "work" / "sbx_1-1")


async def run(sandbox: LiveSandbox, argv: list[str], **options: Any) -> tuple[bytes, bytes, Any]:
    process = await sandbox.link.exec(argv, **options)
    return await collect(process)


async def collect(process: GuestProcess) -> tuple[bytes, bytes, Any]:
    out, err = bytearray(), bytearray()
    async for stream, data in process.output():
        (out if stream == "stdout" else err).extend(data)
    return bytes(out), bytes(err), await process.wait()


async def test_processes_run_one_after_another_in_one_sandbox(sandbox: LiveSandbox) -> None:
    out, err, end = await run(sandbox, ["sh", "-c", "echo $GREETING; echo oops >&2; exit 3"])
    assert (out, err, end.exit_code, end.signal) == (b"hello\n", b"oops\n", 3, None)

    # What one process leaves, the next one sees: it is one machine, not one run.
    await run(sandbox, ["sh", "-c", "echo kept > note.txt"])
    out, _, end = await run(sandbox, ["cat", "note.txt"])
    assert (out, end.exit_code) == (b"kept\n", 0)

    out, _, end = await run(sandbox, ["sh", "-c", "pwd; echo $X"], cwd="/tmp", env={"X": "y"})
    assert out == b"/tmp\ny\n"


async def test_what_exec_starts_is_inside_the_boundary(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    if tier[0] == Tier.PROCESS:
        pytest.skip("the process tier has no boundary")
    probe = "grep -E '^(Uid|Gid|Groups|CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status"
    process = await sandbox.link.exec(["sh", "-c", f"{probe}; echo marker; exec sleep 600"])
    out = bytearray()
    async for _, data in process.output():
        out += data
        if out.endswith(b"marker\n"):
            break
    inside = dict(line.split(":", 1) for line in out.decode().splitlines() if ":" in line)
    assert inside["Uid"].split() == ["1000"] * 4  # the sandbox's user, not root
    assert int(inside["CapEff"], 16) == 0
    assert inside["Seccomp"].strip() == "2"  # the sandbox layer's filter
    if tier[0] == Tier.GVISOR:
        return  # its processes live in gVisor's own kernel: the host sees none of them
    # Seen from the host: the workload's own ids (not Shuttle's), in the sandbox's cgroup
    # (the one its agent is in), not in Shuttle's. A microVM's processes live in its own
    # kernel: what the host sees is the VMM that holds them.
    if tier[0] == Tier.MICROVM:
        host_pid = _agent_host_pid(sandbox)
    else:
        listed = await sandbox.link.call("ps")
        sleeper = next(p for p in listed if "sleep 600" in " ".join(p["argv"]))
        host_pid = _host_pid_of(sandbox.pid, sleeper["os_pid"])
    fields, cgroups = _host_view(host_pid)
    if os.geteuid() == 0:
        assert 0 not in {int(u) for u in fields["Uid"].split()}
        assert fields["Groups"].split() == []
    _, agent_cgroups = _host_view(_agent_host_pid(sandbox))
    _, own_cgroups = _host_view(os.getpid())
    assert cgroups == agent_cgroups
    assert _memory_cgroup(cgroups) != _memory_cgroup(own_cgroups)


def _open_files(pid: int) -> dict[str, int]:
    """What a host process holds open, each with its access mode."""
    opened = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        opened[os.readlink(f"/proc/{pid}/fd/{fd}")] = flags & os.O_ACCMODE
    return opened


def _memory_cgroup(cgroups: str) -> str:
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") or controllers == "":
            return path
    raise AssertionError(cgroups)


def _agent_host_pid(sandbox: LiveSandbox) -> int:
    """The host pid of the sandbox's guest agent (a descendant of what Shuttle spawned); in
    a microVM, of the VMM that runs the guest."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _descends(int(entry), sandbox.pid):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        # The python3 itself, not bubblewrap's processes, whose argv ends the same.
        if argv[0].endswith(b"python3") and b"Agent().run()" in argv[-2]:
            return int(entry)
        if argv[0].endswith(b"qemu-system-x86_64"):
            return int(entry)
    raise AssertionError("no agent found")


def _frozen_from_host(pid: int) -> bool:
    """Whether the kernel holds `pid` frozen: its v1 freezer's state, or v2's cgroup.events."""
    _, cgroups = _host_view(pid)
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "freezer":
            with open(f"/sys/fs/cgroup/freezer{path}/freezer.state") as f:
                return f.read().strip() == "FROZEN"
    for line in cgroups.splitlines():
        if line.startswith("0::"):
            with open(f"/sys/fs/cgroup{line[3:]}/cgroup.events") as f:
                return "frozen 1" in f.read().split("\n")
    raise AssertionError(cgroups)


def _host_view(pid: int) -> tuple[dict[str, str], str]:
    """A host process's status fields, and its cgroups."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    with open(f"/proc/{pid}/cgroup") as f:
        return fields, f.read()


def _host_pid_of(outer: int, inner: int) -> int:
    """The host pid of the process that is `inner` in the PID namespace below `outer`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("NSpid:"):
                        pids = [int(p) for p in line.split()[1:]]
                        if len(pids) > 1 and pids[-1] == inner and _descends(int(entry), outer):
                            return int(entry)
        except OSError:
            continue
    raise AssertionError(f"no process {inner} under {outer}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


async def test_what_exec_starts_meets_the_tier_s_system_call_policy(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    """The escape suite's probe of every denied family (io_uring, mounts, namespaces,
    modules, bpf, ptrace...), run by a process a client started with exec."""
    if tier[0] == Tier.PROCESS:
        pytest.skip("the process tier filters nothing (the escape suite shows the difference)")
    refused = {"EPERM", "ENOSYS"} if tier[0] == Tier.GVISOR else {"EPERM"}
    # The sandbox's root too: its capabilities do not open what the filter closes.
    for user in (None, "root"):
        out, err, end = await run(sandbox, [PY_IN, "-c", probe_code()], user=user)
        assert end.exit_code == 0, err
        seen = json.loads(out)
        assert set(seen) == set(SYSCALL_PROBES)
        assert {name: answer for name, answer in seen.items() if answer not in refused} == {}


def _status(text: str) -> dict[str, str]:
    return {
        k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
    }


def _capability_mask(names: tuple[str, ...]) -> int:
    numbers = {
        "CAP_CHOWN": 0,
        "CAP_DAC_OVERRIDE": 1,
        "CAP_FOWNER": 3,
        "CAP_FSETID": 4,
        "CAP_KILL": 5,
        "CAP_SETGID": 6,
        "CAP_SETUID": 7,
        "CAP_NET_BIND_SERVICE": 10,
    }
    return sum(1 << numbers[name] for name in names)


async def test_exec_and_files_act_as_the_sandbox_s_users(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    ready = await sandbox.link.ready()
    if tier[0] == Tier.PROCESS:
        # One user: the node's own. Naming another is refused, not ignored.
        assert not ready.users
        other = "user" if ready.uid == 0 else "root"
        with pytest.raises(GuestError) as refused:
            await run(sandbox, ["true"], user=other)
        assert refused.value.errno == "EPERM"
        return
    assert ready.users and ready.uid == 1000
    show = "grep -E '^(Uid|Gid|CapEff|CapAmb):' /proc/self/status; echo $HOME $USER"
    out, _, end = await run(sandbox, ["sh", "-c", show], user="root")
    root = _status(out.decode())
    assert (end.exit_code, root["Uid"].split(), root["Gid"].split()) == (0, ["0"] * 4, ["0"] * 4)
    assert int(root["CapEff"], 16) == _capability_mask(ROOT_CAPABILITIES)
    out, _, _ = await run(sandbox, ["sh", "-c", show], user="1000")
    user = _status(out.decode())
    assert user["Uid"].split() == ["1000"] * 4 and int(user["CapEff"], 16) == 0
    assert int(user.get("CapAmb", "0"), 16) == 0

    # The agent: real and saved root, acting as the user, with no effective capability;
    # so the user's processes can neither signal nor trace it. (Read by the user's own
    # process: while it starts a root one, the agent acts as root until that one runs.)
    out, _, _ = await run(sandbox, ["cat", f"/proc/{ready.pid}/status"])
    agent = _status(out.decode())
    assert agent["Uid"].split() == ["0", "1000", "0", "1000"]
    assert int(agent["CapEff"], 16) == 0
    _, _, end = await run(sandbox, ["kill", "-0", str(ready.pid)])
    assert end.exit_code != 0

    # Files: each request as its user, with that user's permissions and ownership.
    await sandbox.link.write_file("/tmp/root-only", b"secret", mode=0o600, user="root")
    await sandbox.link.write_file("/tmp/mine", b"mine")
    owners = {
        entry["name"]: entry["uid"]
        for entry in await sandbox.link.call("list", path="/tmp")
        if entry["name"] in ("root-only", "mine")
    }
    assert owners == {"root-only": 0, "mine": 1000}
    with pytest.raises(GuestError) as denied:
        await sandbox.link.read_file("/tmp/root-only")
    assert denied.value.errno == "EACCES"
    _, chunks = await sandbox.link.read_file("/tmp/root-only", user="root")
    assert b"".join([chunk async for chunk in chunks]) == b"secret"
    # What one user's request did leaves the next request the sandbox's user's again.
    out, _, _ = await run(sandbox, ["id", "-u"])
    assert out == b"1000\n"
    with pytest.raises(GuestError) as unknown:
        await run(sandbox, ["true"], user="no-such-user")
    assert unknown.value.errno == "EINVAL"
    if tier[0] not in (Tier.GVISOR, Tier.MICROVM):  # their processes: not the host's
        # Seen from the host, the sandbox's root is one of the workload's own ids.
        process = await sandbox.link.exec(["sleep", "600"], user="root")
        assert process.os_pid is not None
        fields, _ = _host_view(_host_pid_of(sandbox.pid, process.os_pid))
        assert 0 not in {int(u) for u in fields["Uid"].split()}
        process.signal(signal.SIGKILL)
        await process.wait()


KERNEL_SETTINGS = r"""
import json, os
seen = {}
for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
             "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger", "/sys/kernel/uevent_helper"):
    try:
        with open(path, "w") as f:
            f.write("|/tmp/x\n" if "pattern" in path or "helper" in path else "1\n")
        seen[path] = "written"
    except OSError as exc:
        seen[path] = exc.strerror
for path in ("/dev/mem", "/dev/kmsg", "/dev/vda", "/dev/port"):
    seen[path] = "there" if os.path.exists(path) else "absent"
print(json.dumps(seen))
"""


async def test_the_sandbox_s_root_cannot_change_the_kernel_s_settings(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    """A core_pattern or uevent helper would run as the kernel's own root, past every
    confinement: in a microVM, the guest's root is that kernel's root."""
    if tier[0] == Tier.PROCESS:
        pytest.skip("the process tier runs as Shuttle's user and confines nothing")
    ready = await sandbox.link.ready()
    out, err, end = await run(
        sandbox, [PY_IN, "-c", KERNEL_SETTINGS], user="root" if ready.users else None
    )
    assert end.exit_code == 0, err
    seen = json.loads(out)
    assert {path: what for path, what in seen.items() if what in ("written", "there")} == {}


async def test_a_program_that_is_not_there_is_an_exit_not_a_crash(sandbox: LiveSandbox) -> None:
    _, err, end = await run(sandbox, ["no-such-program-here"])
    assert end.exit_code == 127
    assert b"no-such-program-here" in err
    out, _, _ = await run(sandbox, ["echo", "still", "here"])
    assert out == b"still here\n"


async def test_stdin_is_streamed_and_closed(sandbox: LiveSandbox) -> None:
    process = await sandbox.link.exec(["sh", "-c", "wc -c; echo done"], stdin=True)
    data = os.urandom(3 * 1024 * 1024)
    reading = asyncio.ensure_future(collect(process))
    await process.write_stdin(data)
    process.close_stdin()
    out, _, end = await reading
    assert out.split() == [str(len(data)).encode(), b"done"]
    assert end.exit_code == 0


async def test_signals_reach_the_process(sandbox: LiveSandbox) -> None:
    process = await sandbox.link.exec(["sh", "-c", "echo up; exec sleep 600"])
    outputs = process.output()
    assert await anext(outputs) == ("stdout", b"up\n")
    process.signal(signal.SIGTERM)
    end = await process.wait()
    assert (end.exit_code, end.signal) == (None, signal.SIGTERM)


async def test_a_pty_is_a_terminal_of_the_size_asked(sandbox: LiveSandbox) -> None:
    out, _, end = await run(sandbox, ["sh", "-c", "tty; stty size"], pty=(33, 101))
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1:] == ["33", "101"]
    assert end.exit_code == 0

    shell = await sandbox.link.exec(["sh"], pty=(24, 80))
    shell.resize(50, 132)
    await shell.write_stdin(b"stty size; exit 7\n")
    out, _, end = await collect(shell)
    assert b"50 132" in out
    assert end.exit_code == 7


async def test_background_processes_outlive_the_exec_that_started_them(
    sandbox: LiveSandbox,
) -> None:
    out, _, _ = await run(sandbox, ["sh", "-c", "sleep 600 > /dev/null 2>&1 & echo $!"])
    background = int(out)
    out, _, _ = await run(sandbox, ["sh", "-c", f"kill -0 {background} && echo alive"])
    assert out == b"alive\n"


async def test_files_go_both_ways_binary_safe(sandbox: LiveSandbox) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    size = await sandbox.link.write_file("data/blob.bin", data)
    assert size == len(data)
    length, chunks = await sandbox.link.read_file("data/blob.bin")
    assert length == len(data)
    assert b"".join([chunk async for chunk in chunks]) == data

    out, _, _ = await run(sandbox, ["sh", "-c", "wc -c < data/blob.bin"])
    assert int(out) == len(data)

    assert await sandbox.link.call("mkdir", path="a/b/c") is True
    await sandbox.link.call("move", source="data/blob.bin", target="a/b/c/moved.bin")
    listing = await sandbox.link.call("list", path="a", depth=3)
    assert [(e["name"], e["type"]) for e in listing] == [
        ("b", "dir"),
        ("c", "dir"),
        ("moved.bin", "file"),
    ]
    stat = await sandbox.link.call("stat", path="a/b/c/moved.bin")
    assert stat["size"] == len(data)
    await sandbox.link.call("remove", path="a")
    with pytest.raises(GuestError) as missing:
        await sandbox.link.call("stat", path="a")
    assert missing.value.errno == "ENOENT"
    with pytest.raises(GuestError):
        await sandbox.link.read_file("no/such/file")


async def test_names_that_are_not_utf8_are_listed_not_fatal(sandbox: LiveSandbox) -> None:
    # Any program may make such a name; listing it must not break the sandbox's link.
    await run(sandbox, [PY_IN, "-c", "open(b'odd-\\xff-name', 'w').close()"])
    listing = await sandbox.link.call("list", path=".")
    assert "odd-\ufffd-name" in [entry["name"] for entry in listing]
    out, _, _ = await run(sandbox, ["echo", "still", "here"])
    assert out == b"still here\n"


async def test_the_agent_holds_nothing_of_the_host_open(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    if tier[0] == Tier.PROCESS:
        pytest.skip("the process tier isolates nothing")
    if tier[0] == Tier.MICROVM:
        # The agent holds its guest's objects. What the host sees is the VMM's: its stdio,
        # its own kernel objects, the config disk, and files of the read-only root it
        # shares with the guest (those the guest has open), each open for reading only;
        # and the one file it may write, its scratch disk, unlinked from the start.
        opened = _open_files(_agent_host_pid(sandbox))
        assert not [t for t in opened if t.startswith("socket:")]
        shared = {t: mode for t, mode in opened.items() if t.startswith("/") and t != "/dev/null"}
        writable = [t for t, mode in shared.items() if mode != os.O_RDONLY]
        assert shared and [shared[t] for t in writable] == [os.O_RDWR]
        assert "/microvm-scratch/" in writable[0] and writable[0].endswith(" (deleted)")
        return
    # The agent's fds: pipes, /dev/null, the kernel's own objects (gVisor names the stdio
    # it was given `host:[n]`, and its tier's result FIFO lives in the sandbox's own /dev).
    if tier[0] == Tier.GVISOR:
        # As its child sees them: the host sees gVisor's own process, not the agent.
        script = 'for f in /proc/$PPID/fd/*; do readlink "$f"; done'
        out, _, _ = await run(sandbox, ["sh", "-c", script], user="root")
        held = set(out.decode().split())
    else:
        # As the host sees them. Nothing inside may look: having changed its ids, the
        # agent is not dumpable, and no user of the sandbox has CAP_SYS_PTRACE.
        agent = _agent_host_pid(sandbox)
        held = {os.readlink(f"/proc/{agent}/fd/{fd}") for fd in os.listdir(f"/proc/{agent}/fd")}
        inner = (await sandbox.link.ready()).pid
        _, _, end = await run(sandbox, ["readlink", f"/proc/{inner}/fd/0"], user="root")
        assert end.exit_code != 0
    assert held
    unexpected = {
        target
        for target in held
        if target != "/dev/null"
        and not target.startswith(("pipe:", "anon_inode:", "host:[", "/dev/treadle/"))
    }
    assert unexpected == set()


async def test_paths_resolve_inside_the_sandbox(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox, tmp_path: Path
) -> None:
    if tier[0] == Tier.PROCESS:
        pytest.skip("the process tier isolates nothing: its paths are the host's")
    secret = tmp_path / "host-secret"
    secret.write_text("host only")
    # A link planted by the sandbox's own code, `..` past the root, absolute paths: all
    # are the sandbox's view, in which the host's file does not exist.
    await run(sandbox, ["ln", "-s", str(secret), "planted"])
    for path in ("planted", f"../../../..{secret}", str(secret)):
        with pytest.raises(GuestError) as refused:
            await sandbox.link.read_file(path)
        assert refused.value.errno == "ENOENT", path
    with pytest.raises(GuestError) as read_only:
        await sandbox.link.write_file("/usr/bin/planted", b"x")
    assert read_only.value.errno in ("EROFS", "EACCES")
    _, chunks = await sandbox.link.read_file("/etc/passwd")
    passwd = b"".join([c async for c in chunks])
    assert passwd != HOST_PASSWD  # the sandbox's own


async def test_a_reader_that_stops_holds_back_only_its_own_stream(sandbox: LiveSandbox) -> None:
    # This process writes far more than one window; nobody reads it.
    flood = await sandbox.link.exec(["sh", "-c", "yes flood | head -c 50000000"])
    # Others go on: a process's output, a file, a listing.
    out, _, end = await run(sandbox, ["echo", "through"])
    assert (out, end.exit_code) == (b"through\n", 0)
    await sandbox.link.write_file("f.txt", b"fine")
    assert (await sandbox.link.call("stat", path="f.txt"))["size"] == 4
    assert flood.exit is None  # held back, not dropped
    received = 0
    async for _, data in flood.output():
        received += len(data)
    assert received == 50_000_000
    assert (await flood.wait()).exit_code == 0


async def test_pause_freezes_every_process_and_resume_goes_on(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    if tier[0] == Tier.PROCESS:
        with pytest.raises(box.Unsupported):
            await sandbox.pause()
        return
    ticker = await sandbox.link.exec(
        ["sh", "-c", "i=0; while read line; do i=$((i+1)); echo $i; done"], stdin=True
    )
    outputs = ticker.output()
    await ticker.write_stdin(b"a\n")
    assert await anext(outputs) == ("stdout", b"1\n")
    await sandbox.pause()
    assert sandbox.paused
    agent = None if tier[0] == Tier.GVISOR else _agent_host_pid(sandbox)
    if agent is not None:  # gVisor's processes are in its own kernel, out of sight (a
        # microVM's are too, but its VMM is frozen with them)
        assert _frozen_from_host(agent)
    await sandbox.resume()
    assert not sandbox.paused
    if agent is not None:
        assert not _frozen_from_host(agent)
    await ticker.write_stdin(b"b\n")
    assert await anext(outputs) == ("stdout", b"2\n")


async def test_stop_ends_every_process_and_releases_the_sandbox(
    tier: tuple[Tier, dict[str, Any]], tmp_path: Path
) -> None:
    sandbox = await start(tier, tmp_path)
    process = await sandbox.link.exec(["sh", "-c", "trap '' TERM; echo up; sleep 600"])
    assert await anext(process.output()) == ("stdout", b"up\n")
    status = await sandbox.stop(grace_s=0.2)
    assert status.reason == "stopped"
    assert sandbox.link.closed
    with pytest.raises(LinkBroken):
        await process.wait()
    with pytest.raises(LinkBroken):
        await sandbox.link.exec(["true"])


HOSTILE = {
    "oversized frame": "import os,struct; os.write(1, struct.pack('>II', 1<<30, 0)); input()",
    "not json": "import os,struct; os.write(1, struct.pack('>II', 3, 0) + b'{{{'); input()",
    "payload where none belongs": (
        "import os,struct,json; h=json.dumps({'ev':'ready','pid':1,'uid':0}).encode();"
        "os.write(1, struct.pack('>II', len(h), 5) + h + b'xxxxx'); input()"
    ),
    "answers to nothing asked": (
        "import os,struct,json,time\n"
        "def send(d, p=b''):\n"
        "    h = json.dumps(d).encode(); os.write(1, struct.pack('>II', len(h), len(p)) + h + p)\n"
        "send({'ev':'ready','pid':1,'uid':0})\n"
        "import select; select.select([0], [], [])\n"
        "send({'ev':'result','req':999,'value':'x'*1000}); input()"
    ),
    "empty output frames": (
        "import os,struct,json\n"
        "def send(d, p=b''):\n"
        "    h = json.dumps(d).encode(); os.write(1, struct.pack('>II', len(h), len(p)) + h + p)\n"
        "send({'ev':'ready','pid':1,'uid':0})\n"
        "import select; select.select([0], [], [])\n"
        "send({'ev':'out','pid':1,'stream':'stdout'}); input()"
    ),
    "events for nothing asked": (
        "import os,struct,json\n"
        "def send(d, p=b''):\n"
        "    h = json.dumps(d).encode(); os.write(1, struct.pack('>II', len(h), len(p)) + h + p)\n"
        "send({'ev':'ready','pid':1,'uid':0}); send({'ev':'out','pid':7,'stream':'stdout'}, b'x')\n"
        "input()"
    ),
}


@pytest.mark.parametrize("behaviour", sorted(HOSTILE))
async def test_a_hostile_agent_ends_its_own_sandbox_and_nothing_else(
    tier: tuple[Tier, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
) -> None:
    neighbour = await start(tier, tmp_path / "neighbour")
    try:
        monkeypatch.setattr(box, "AGENT_SOURCE", HOSTILE[behaviour])
        try:
            hostile = await start(tier, tmp_path / "hostile", id="sbx_2")
        except OSError as exc:
            assert "agent" in str(exc)
        else:
            # It got as far as a valid "ready": the next frame breaks its link, and that
            # ends the sandbox, whatever it still runs.
            with pytest.raises(LinkBroken):
                await hostile.link.exec(["true"])
            ended = await hostile.ended
            assert ended.reason == "protocol_error"
            assert (await hostile.stop(grace_s=0)).reason == "protocol_error"
        out, _, end = await run(neighbour, ["echo", "unharmed"])
        assert (out, end.exit_code) == (b"unharmed\n", 0)
    finally:
        await neighbour.stop(grace_s=0)


TCP_ECHO = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(4)\n"
    "print('listening', flush=True)\n"
    "c, _ = s.accept()\n"
    "data = b''\n"
    "while chunk := c.recv(65536): data += chunk\n"
    "c.sendall(data.upper()); c.close()\n"
)


async def test_a_port_on_the_sandbox_s_loopback_is_reached_from_inside(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    server = await sandbox.link.exec([PY_IN, "-c", TCP_ECHO, "7000"])
    outputs = server.output()
    assert await anext(outputs) == ("stdout", b"listening\n")
    connection = await sandbox.link.connect(7000)
    await connection.write_stdin(b"hello " * 50_000)
    connection.close_stdin()  # the server reads its end of file, then answers
    out, _, end = await collect(connection)
    assert (out, end.exit_code) == (b"HELLO " * 50_000, 0)
    assert (await server.wait()).exit_code == 0

    with pytest.raises(GuestError) as refused:
        await sandbox.link.connect(7001)
    assert refused.value.errno == "ECONNREFUSED"

    if tier[0] != Tier.PROCESS:
        # The node's own loopback is another network: what listens there is out of reach.
        listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        host_port = listener.sockets[0].getsockname()[1]
        try:
            with pytest.raises(GuestError):
                await sandbox.link.connect(host_port)
        finally:
            listener.close()


async def test_a_connection_closed_from_outside_ends(sandbox: LiveSandbox) -> None:
    server = await sandbox.link.exec([PY_IN, "-c", TCP_ECHO, "7002"])
    assert await anext(server.output()) == ("stdout", b"listening\n")
    connection = await sandbox.link.connect(7002)
    connection.signal(signal.SIGKILL)  # the client went away
    assert (await connection.wait()).exit_code == 0
    assert (await server.wait()).exit_code == 0  # its server saw the connection end


async def test_activity_counts_what_runs_besides_the_agent(sandbox: LiveSandbox) -> None:
    quiet = await sandbox.link.call("activity")
    assert quiet["processes"] == 0 and quiet["hz"] > 0
    await run(sandbox, ["sh", "-c", "sleep 600 > /dev/null 2>&1 &"])
    busy = await sandbox.link.call("activity")
    assert busy["processes"] == 1  # the orphaned sleep, whoever adopted it
    await run(sandbox, [PY_IN, "-c", "sum(range(3_000_000))"])
    spent = await sandbox.link.call("activity")
    assert spent["ticks"] > quiet["ticks"]  # exited processes' CPU counts too


COUNTER = (
    "import time\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    print(n, time.time(), flush=True)\n"
    "    time.sleep(0.005)\n"
)


async def test_a_paused_counter_loses_no_work_and_its_gap_is_the_pause(
    tier: tuple[Tier, dict[str, Any]], sandbox: LiveSandbox
) -> None:
    if tier[0] == Tier.PROCESS:
        return  # nothing to freeze: see the pause test
    counter = await sandbox.link.exec([PY_IN, "-c", COUNTER])
    lines: list[tuple[int, float]] = []
    pending = b""

    async def read_past(moment: float) -> None:
        nonlocal pending
        async for _, data in counter.output():
            pending += data
            *whole, pending = pending.split(b"\n")
            lines.extend((int(n), float(t)) for n, t in (line.split() for line in whole))
            if lines and lines[-1][1] > moment:
                return

    await read_past(time.time())
    await sandbox.pause()
    frozen_at = time.time()
    await asyncio.sleep(0.3)  # the length of the pause is the test's input, not a wait
    thawed_at = time.time()
    await sandbox.resume()
    await read_past(thawed_at + 0.05)
    counter.signal(signal.SIGKILL)

    # No work lost or done twice: its own count goes on by one.
    assert [n for n, _ in lines] == list(range(1, len(lines) + 1))
    if tier[0] == Tier.MICROVM:
        # Its clock is its own kernel's, set from the node's at boot to within QEMU's own
        # start: the pause shows as a gap in it, at least as long.
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(lines)]
        assert max(gaps) >= thawed_at - frozen_at
        return
    # Nothing ran while frozen, and its clock jumped by (at least) the pause.
    assert not [t for _, t in lines if frozen_at < t < thawed_at]
    before = max(t for _, t in lines if t <= frozen_at)
    after = min(t for _, t in lines if t >= thawed_at)
    assert after - before >= thawed_at - frozen_at


async def test_an_upload_given_up_midway_leaves_the_link_working(sandbox: LiveSandbox) -> None:
    first_sent = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        first_sent.set()
        await asyncio.Event().wait()  # a client that never sends the rest
        yield b""

    upload = asyncio.create_task(sandbox.link.write_file("partial.bin", chunks()))
    await first_sent.wait()
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    out, _, end = await run(sandbox, ["echo", "still here"])
    assert (out, end.exit_code) == (b"still here\n", 0)
    assert not sandbox.link.closed


async def test_changes_under_a_directory_are_watched(sandbox: LiveSandbox) -> None:
    await sandbox.link.call("mkdir", path="w/sub")
    watch = await sandbox.link.watch("w", recursive=True)
    changes = watch.output()
    seen: list[dict[str, Any]] = []

    async def until(wanted: dict[str, Any]) -> None:
        pending = b""
        while wanted not in seen:
            _, data = await anext(changes)
            pending += data
            *lines, pending = pending.split(b"\n")
            seen.extend(json.loads(line) for line in lines)

    await run(sandbox, ["sh", "-c", "echo a > w/a.txt"])
    await until({"type": "create", "name": "a.txt", "dir": False})
    await until({"type": "write", "name": "a.txt", "dir": False})
    await run(sandbox, ["sh", "-c", "mkdir w/new && echo b > w/new/b.txt && echo c > w/sub/c"])
    await until({"type": "create", "name": "new", "dir": True})
    await until({"type": "create", "name": "new/b.txt", "dir": False})
    await until({"type": "create", "name": "sub/c", "dir": False})
    await run(sandbox, ["sh", "-c", "mv w/a.txt w/z.txt && rm w/z.txt && chmod 700 w/sub"])
    await until({"type": "rename", "name": "a.txt", "dir": False})
    await until({"type": "remove", "name": "z.txt", "dir": False})
    await until({"type": "chmod", "name": "sub", "dir": True})
    watch.signal(signal.SIGTERM)
    assert (await watch.wait()).exit_code == 0

    with pytest.raises(GuestError) as not_dir:
        await sandbox.link.watch("w/sub/c")
    assert not_dir.value.errno == "ENOTDIR"
    with pytest.raises(GuestError) as missing:
        await sandbox.link.watch("nowhere")
    assert missing.value.errno == "ENOENT"


async def test_a_request_whose_caller_is_cancelled_leaves_the_link_working(
    sandbox: LiveSandbox,
) -> None:
    for _ in range(20):
        asked = asyncio.create_task(sandbox.link.call("stat", path="."))
        await asyncio.sleep(0)  # sent; its answer is on its way
        asked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asked
    out, _, end = await run(sandbox, ["echo", "still here"])
    assert (out, end.exit_code) == (b"still here\n", 0)
    assert not sandbox.link.closed


async def test_a_sandbox_s_home_is_where_it_asked(
    tier: tuple[Tier, dict[str, Any]], tmp_path: Path
) -> None:
    if tier[0] == Tier.PROCESS:
        pytest.skip("the process tier's home is its directory on the host")
    sandbox = await start(tier, tmp_path, home="/home/user")
    try:
        out, err, end = await run(sandbox, ["sh", "-c", "pwd; echo $HOME; ls -A; touch made"])
        assert (end.exit_code, out.decode().splitlines()) == (0, ["/home/user", "/home/user"]), err
        await sandbox.link.write_file("note.txt", b"relative")
        out, _, _ = await run(sandbox, ["cat", "/home/user/note.txt"])
        assert out == b"relative"
        names = sorted(e["name"] for e in await sandbox.link.call("list", path="."))
        assert names == ["made", "note.txt"]  # nothing of treadle's own (no args file)
    finally:
        await sandbox.stop(grace_s=1)
