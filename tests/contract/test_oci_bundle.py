"""OCI bundles for the `oci` and `gvisor` tiers: what `build_config` writes, and what it
does when crun, runc and runsc really run it (each parametrized; skipped where a tool is not
installed, except in CI).

Programs run on the host rootfs (the host's /usr, read-only) and use /usr/bin/python3 where
the shell is not enough. A container that must be stopped from outside prints a marker
first; the test waits for the marker, so nothing here depends on timing.
"""

from __future__ import annotations

import json
import platform
import resource
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import eventually
from support.oci import KINDS, OciHarness, harness_for, oci_base  # noqa: F401
from treadle.domain.resources import Resources
from treadle.shuttle.oci.bundle import (
    CONTAINER_PREFIX,
    BundleError,
    Identity,
    Limits,
    RuntimeTraits,
    build_config,
    new_container_id,
    prepare_bundle,
    seccomp_profile,
)
from treadle.shuttle.oci.rootfs import Rootfs
from treadle.shuttle.oci.tools import ToolKind, cgroup_dirs, classify_exit, sweep
from treadle.shuttle.sandbox.cgroups import cpu_bandwidth
from treadle.shuttle.sandbox.seccomp import X86_64, arch_for_machine, oci_profile

PY = "/usr/bin/python3"


def _config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "argv": ["echo", "13"],
        "env": {"GREETING": "hi"},
        "rootfs": Rootfs(path=tmp_path, reference="test", env=("PATH=/opt/bin", "LANG=de")),
        "workdir": tmp_path / "work",
        "container_id": "treadle-ex_1-1-abcd",
        "limits": Limits(memory_mib=128, cpu_millicores=500, pids=64),
        "identity": Identity(),
    }
    options.update(overrides)
    return build_config(**options)


# What the config says


def test_config_isolates_the_program(tmp_path: Path) -> None:
    config = _config(tmp_path)
    process = config["process"]
    linux = config["linux"]
    assert config["root"] == {"path": str(tmp_path), "readonly": True}
    assert process["args"] == ["echo", "13"]
    assert process["cwd"] == "/work"
    assert process["noNewPrivileges"] is True
    assert process["user"]["uid"] != 0
    assert all(caps == [] for caps in process["capabilities"].values())
    assert {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024} in process["rlimits"]
    assert {ns["type"] for ns in linux["namespaces"]} == {
        "cgroup",  # /proc/self/cgroup shows "/": nothing of the node's other groups
        "pid",
        "ipc",
        "uts",
        "mount",
        "network",
        "user",
    }
    assert all("path" not in ns for ns in linux["namespaces"])  # new ones, never the host's
    assert linux["uidMappings"][0]["hostID"] >= 65536
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]
    resources = linux["resources"]
    assert resources["memory"] == {"limit": 128 << 20, "swap": 128 << 20}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}
    assert resources["pids"] == {"limit": 64}
    assert linux["cgroupsPath"] == "/treadle/treadle-ex_1-1-abcd"


def test_mounts_give_a_private_tmp_and_the_work_dir(tmp_path: Path) -> None:
    mounts = {m["destination"]: m for m in _config(tmp_path)["mounts"]}
    assert mounts["/tmp"]["type"] == "tmpfs"
    assert f"size={64 << 20}" in mounts["/tmp"]["options"]
    assert mounts["/work"]["source"] == str(tmp_path / "work")
    assert "rw" in mounts["/work"]["options"]
    binds = Rootfs(path=tmp_path, reference="host", binds=("/usr", "/etc/ld.so.cache"))
    mounts = {m["destination"]: m for m in _config(tmp_path, rootfs=binds)["mounts"]}
    assert mounts["/usr"]["source"] == "/usr"
    assert "ro" in mounts["/usr"]["options"]
    assert "ro" in mounts["/etc/ld.so.cache"]["options"]


def test_environment_layers_image_function_and_conventions(tmp_path: Path) -> None:
    env = dict(
        item.split("=", 1)
        for item in _config(tmp_path, env={"HOME": "/root", "GREETING": "hi"})["process"]["env"]
    )
    assert env["PATH"] == "/opt/bin"  # the image's
    assert env["LANG"] == "de"
    assert env["GREETING"] == "hi"
    assert env["HOME"] == "/work"  # the sandbox's, whatever the function says
    assert env["TMPDIR"] == "/work"
    assert env["TREADLE_ARGS_FILE"] == "/work/args.json"
    assert env["TREADLE_RESULT_FD"] == "3"


def test_bundles_carry_the_sandbox_layers_seccomp_policy(tmp_path: Path) -> None:
    native = arch_for_machine()
    assert native is not None
    assert _config(tmp_path)["linux"]["seccomp"] == oci_profile(native)
    assert seccomp_profile("x86_64", clone3=False) == oci_profile(X86_64, clone3=False)
    with pytest.raises(BundleError, match="no seccomp table"):
        seccomp_profile("riscv64")


def test_gvisor_traits_leave_room_for_the_sandbox(tmp_path: Path) -> None:
    traits = RuntimeTraits(
        pids_per_task=2,
        pids_overhead=100,
        memory_overhead_mib=32,
        cpu_overhead_millicores=1000,
        seccomp_clone3=False,
    )
    linux = _config(tmp_path, traits=traits)["linux"]
    assert linux["resources"]["pids"] == {"limit": 228}
    assert linux["resources"]["memory"]["limit"] == 160 << 20
    # the function's 500 millicores and a CPU for gVisor's own kernel
    assert linux["resources"]["cpu"] == {"quota": 150_000, "period": 100_000}


def test_result_fifo_starts_the_program_through_a_shell(tmp_path: Path) -> None:
    config = _config(tmp_path, result_fifo_dir=tmp_path / "result")
    args = config["process"]["args"]
    assert args[:2] == ["/bin/sh", "-c"]
    assert args[-2:] == ["echo", "13"]
    assert any(m["destination"] == "/dev/treadle" for m in config["mounts"])


def test_container_ids_are_unique_and_valid() -> None:
    ids = {new_container_id("ex/1 ü", 2) for _ in range(50)}
    assert len(ids) == 50
    for container_id in ids:
        assert container_id.startswith(CONTAINER_PREFIX + "ex_1__-2-")
        assert all(c.isalnum() or c in "_.-" for c in container_id)


def test_limits_from_resources() -> None:
    limits = Limits.from_resources(Resources(cpu_millicores=250, memory_mib=512), pids=10)
    assert (limits.memory_mib, limits.cpu_quota_us, limits.pids) == (512, 25_000, 10)
    assert Limits(cpu_millicores=1).cpu_quota_us == 1000  # the kernel's minimum


@pytest.mark.parametrize("millicores", [1, 10, 100, 250, 4000])
def test_the_cpu_share_is_the_one_every_tier_applies(millicores: int) -> None:
    quota, period = cpu_bandwidth(millicores)
    limits = Limits(cpu_millicores=millicores)
    assert (limits.cpu_quota_us, limits.cpu_period_us) == (quota, period)


def test_prepare_refuses_a_fifo_bundle_without_a_shell(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    with pytest.raises(BundleError, match="no /bin/sh"):
        prepare_bundle(
            tmp_path / "bundles",
            container_id="treadle-x-1-0",
            argv=["true"],
            env={},
            rootfs=Rootfs(path=rootfs, reference="empty"),
            workdir=tmp_path / "work",
            limits=Limits(),
            identity=Identity(),
            traits=RuntimeTraits(result_fifo=True),
        )
    assert not (tmp_path / "bundles" / "treadle-x-1-0").exists()


@pytest.mark.parametrize(
    ("exit_code", "oom_kills", "reason"),
    [
        (0, 0, None),
        (3, 0, None),
        (137, 1, "oom_killed"),
        (137, 0, "killed:SIGKILL"),
        (143, 0, "killed:SIGTERM"),
        (-9, 2, "oom_killed"),
        (None, 0, "spawn_failed"),
    ],
)
def test_classify_exit(exit_code: int | None, oom_kills: int, reason: str | None) -> None:
    assert classify_exit(exit_code, oom_kills=oom_kills, killed=False) == reason


# What the runtimes do with it


@pytest.fixture(scope="module", params=KINDS)
def oci(request: pytest.FixtureRequest, oci_base: Path) -> Iterator[OciHarness]:  # noqa: F811
    yield from harness_for(request.param, oci_base)


def test_echo_13(oci: OciHarness) -> None:
    run = oci.run(["echo", "13"])
    assert (run.exit_code, run.stdout, run.reason) == (0, b"13\n", None)


def test_stdin_stdout_stderr_and_exit_code_pass_through(oci: OciHarness) -> None:
    run = oci.run(["/bin/sh", "-c", "cat; echo oops >&2; exit 7"], stdin=b"hello\nworld\n")
    assert run.stdout == b"hello\nworld\n"
    assert run.stderr == b"oops\n"
    assert (run.exit_code, run.reason, run.runtime_error) == (7, None, None)


def test_result_arrives_on_fd_3(oci: OciHarness) -> None:
    run = oci.run(["/bin/sh", "-c", 'echo \'{"answer": 42}\' >&"$TREADLE_RESULT_FD"; echo out'])
    assert run.exit_code == 0
    assert json.loads(run.result) == {"answer": 42}
    assert run.stdout == b"out\n"


def test_work_dir_args_file_and_identity(oci: OciHarness) -> None:
    script = 'pwd; echo "$HOME"; cat "$TREADLE_ARGS_FILE"; echo; id -u; echo x > mine && cat mine'
    run = oci.run(["/bin/sh", "-c", script], args={"n": 5})
    assert run.exit_code == 0, run.stderr
    lines = run.stdout.decode().splitlines()
    assert lines[:2] == ["/work", "/work"]
    assert json.loads(lines[2]) == {"n": 5}
    assert lines[3] == "1000"
    assert lines[4] == "x"


def test_root_is_read_only_and_tmp_is_private_and_writable(oci: OciHarness) -> None:
    script = textwrap.dedent(
        """
        for path in /usr/x /x /etc/x; do
          if echo x > "$path"; then echo "wrote $path"; fi
        done
        echo tmp > /tmp/x && cat /tmp/x
        grep -E '^[^ ]+ / ' /proc/mounts
        """
    )
    run = oci.run(["/bin/sh", "-c", script])
    assert run.exit_code == 0, run.stderr
    assert b"wrote" not in run.stdout
    lines = run.stdout.decode().splitlines()
    assert lines[0] == "tmp"
    root_options = lines[1].split()[3].split(",")
    assert "ro" in root_options


def test_no_capabilities_and_dangerous_syscalls_fail(oci: OciHarness) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the syscall numbers below are x86_64's")
    script = textwrap.dedent(
        """
        import ctypes, threading
        libc = ctypes.CDLL(None, use_errno=True)
        calls = {"ptrace": (101, 0, 0, 0, 0), "unshare": (272, 0x10000000),
                 "setns": (308, 0, 0), "mount": (165, 0, 0, 0, 0, 0), "bpf": (321, 0, 0, 0),
                 "keyctl": (250, 0, 0), "userfaultfd": (323, 0),
                 "open_by_handle_at": (304, 0, 0, 0), "kexec_load": (246, 0, 0, 0, 0)}
        for name, args in calls.items():
            ctypes.set_errno(0)
            rc = libc.syscall(*args)
            print(name, rc, ctypes.get_errno())
        caps = [l for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd"))]
        print(*[c.split()[1] for c in caps])
        t = threading.Thread(target=print, args=("threads work",))
        t.start()
        t.join()
        """
    )
    run = oci.run([PY, "-c", script])
    assert run.exit_code == 0, run.stderr
    lines = run.stdout.decode().splitlines()
    for line in lines[:-2]:
        name, rc, errno = line.split()
        assert (rc, errno) == ("-1", "1"), f"{name} was not refused with EPERM: {line}"
    assert lines[-2] == "0000000000000000 0000000000000000"
    assert lines[-1] == "threads work"


def test_no_network(oci: OciHarness) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        script = textwrap.dedent(
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=5)
                print("connected")
            except OSError as exc:
                print("refused", exc.errno)
            print(sorted(n for _, n in socket.if_nameindex()))
            """
        )
        run = oci.run([PY, "-c", script])
        assert run.exit_code == 0, run.stderr
        lines = run.stdout.decode().splitlines()
        assert lines[0].startswith("refused")
        assert lines[1] == "['lo']"
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_memory_hog_is_oom_killed(oci: OciHarness) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n"
    run = oci.run([PY, "-c", hog], limits=Limits(memory_mib=64))
    assert run.exit_code == 128 + 9
    if oci.oom_log.available or run.oom_kills is not None:
        assert run.oom_kills
        assert run.reason == "oom_killed"


def test_pids_limit_stops_a_fork_bomb(oci: OciHarness) -> None:
    bomb = textwrap.dedent(
        """
        import os
        r, w = os.pipe()
        children = 0
        try:
            while children < 1000:
                if os.fork() == 0:
                    os.close(w)
                    os.read(r, 1)  # until the parent closes the pipe
                    os._exit(0)
                children += 1
        except OSError as exc:
            print("fork failed after", children, exc.errno)
        os.close(w)
        for _ in range(children):
            os.wait()
        """
    )
    # The pids cgroup stops it under crun and runc (RLIMIT_NPROC set out of its way); under
    # gVisor the host cgroup also counts the sandbox's own tasks, and the sentry enforces
    # RLIMIT_NPROC itself.
    gvisor = oci.tool.kind is ToolKind.RUNSC
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    loose = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    run = oci.run([PY, "-c", bomb], limits=Limits(pids=32, nproc=32 if gvisor else loose))
    assert run.exit_code == 0, run.stderr
    words = run.stdout.decode().split()
    assert words[:3] == ["fork", "failed", "after"]
    assert int(words[3]) < 32
    assert words[4] == "11"  # EAGAIN


def test_kill_ends_the_container_and_delete_leaves_nothing(oci: OciHarness) -> None:
    container = oci.start(["/bin/sh", "-c", "echo started; exec sleep 600"])
    bundle = container.bundle
    try:
        assert container.read_until(b"started\n")
        assert cgroup_dirs(bundle.cgroups_path)
        assert bundle.container_id in oci.tool.containers()
    finally:
        oci.tool.kill(bundle.container_id)
        run = container.finish(killed=True)
        oci.remove_workdir(bundle)
    assert run.exit_code == 128 + 9
    assert run.reason == "cancelled"
    assert bundle.container_id not in oci.tool.containers()
    assert cgroup_dirs(bundle.cgroups_path) == []
    assert not bundle.path.exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert bundle.container_id not in mounts
    assert str(bundle.path) not in mounts


def test_sweep_removes_what_a_dead_shuttle_left(oci: OciHarness) -> None:
    container = oci.start(["/bin/sh", "-c", "echo started; exec sleep 600"])
    bundle = container.bundle
    assert container.read_until(b"started\n")
    # The runtime writes its state a moment after the program starts: what it knows of.
    eventually(lambda: bundle.container_id in oci.tool.containers(), what="the state")
    # The runtime process dies with its Shuttle; the container goes on without it.
    container.abandon()
    assert bundle.container_id in oci.tool.containers()
    report = sweep([oci.tool], bundles_dir=oci.bundles_dir, cgroup_parent=oci.cgroup_parent)
    oci.remove_workdir(bundle)
    assert report.containers == [bundle.container_id]
    assert report.bundles == [bundle.container_id]
    assert report.errors == []
    assert oci.tool.containers() == []
    assert cgroup_dirs(bundle.cgroups_path) == []
    assert not bundle.path.exists()
