"""A sandbox works in any image, one with no Python included (DESIGN §10: "nothing is
required inside the image"): its guest agent runs on the Python runtime Shuttle brings, bound
read-only at `/.treadle/agent`, in every tier that runs images here (oci with crun and runc,
gvisor, and microvm, whose guest's root is the image, shared read-only over 9p). The image
is a static busybox pushed to a registry on loopback; everything runs for real."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from support.registry import (  # noqa: F401
    Registry,
    build_busybox_layout,
    push_busybox,
    registry,
    require,
)
from support.runtimes import make_runtime, runtime_params
from treadle.domain.resources import Resources, Tier
from treadle.shuttle.live.agent_runtime import MOUNT_POINT
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.live.link import GuestError
from treadle.shuttle.microvm.runtime import MicrovmRuntime
from treadle.shuttle.runtimes.process import ProcessRuntime

REPOSITORY = "treadle/busybox-any-image"
IMAGE_TIERS = [
    param
    for param in runtime_params(process=False, microvm=True)
    if param.values[0][0] in (Tier.OCI, Tier.GVISOR, Tier.MICROVM)
]
# What would point a program at the runtime's interpreter or libraries if it leaked.
RUNTIME_VARIABLES = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONPATH")


@pytest.fixture(scope="module")
def pushed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    return push_busybox(registry, tmp_path_factory.mktemp("busybox"), REPOSITORY)


@pytest.fixture(scope="module")
def hostile(
    registry: Registry,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path]:
    """An image whose `/.treadle` is a link to a directory of the host's (which the link
    names by its host path): the reference, and that directory."""
    require("umoci", "/bin/busybox")
    base = tmp_path_factory.mktemp("hostile")
    target = base / "host-dir"
    target.mkdir()
    layout = build_busybox_layout(base / "layout", "v1")
    extra = base / "extra"
    extra.mkdir()
    (extra / ".treadle").symlink_to(target)
    subprocess.run(
        ["umoci", "insert", "--image", f"{layout}:v1", str(extra), "/"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return registry.push(layout, "v1", f"{REPOSITORY}-hostile"), target


@pytest.fixture(scope="module")
def with_device(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """An image holding a block device node, readable and writable by all, at /disk: 254:0,
    the first virtio disk (on a host that is itself a VM, often its root disk; in a microVM
    guest, the config disk)."""
    require("umoci", "/bin/busybox")
    if os.geteuid() != 0:
        pytest.skip("making a device node in an image needs root")
    base = tmp_path_factory.mktemp("device")
    layout = build_busybox_layout(base / "layout", "v1")
    extra = base / "extra"
    extra.mkdir()
    os.mknod(extra / "disk", 0o666 | stat.S_IFBLK, os.makedev(254, 0))
    subprocess.run(
        ["umoci", "insert", "--image", f"{layout}:v1", str(extra), "/"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return registry.push(layout, "v1", f"{REPOSITORY}-device")


@pytest.fixture(params=IMAGE_TIERS)
def tier(request: pytest.FixtureRequest) -> tuple[Tier, dict[str, Any]]:
    param: tuple[Tier, dict[str, Any]] = request.param
    return param


@pytest.fixture
async def sandbox(
    tier: tuple[Tier, dict[str, Any]],
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    pushed: str,
) -> AsyncIterator[LiveSandbox]:
    started = await start(tier, tmp_path, image=pushed, insecure=[registry.host])
    try:
        yield started
    finally:
        await started.stop(grace_s=1)


async def start(
    tier: tuple[Tier, dict[str, Any]],
    home: Path,
    *,
    image: str | None = None,
    insecure: list[str] | None = None,
) -> LiveSandbox:
    runtime = make_runtime(tier, home, insecure_registries=insecure or [])
    assert isinstance(runtime, (ProcessRuntime, MicrovmRuntime))
    spec = SandboxSpec(
        id="sbx_img",
        incarnation=1,
        tenant_id="tn_1",
        resources=Resources(cpu_millicores=1000, memory_mib=256),
        isolation=tier[0],
        env={"GREETING": "hello"},
        image=image,
    )
    return await LiveSandbox.start(runtime.launcher, spec, home / "work" / "sbx_img-1")


async def run(sandbox: LiveSandbox, argv: list[str]) -> tuple[bytes, bytes, int | None]:
    process = await sandbox.link.exec(argv)
    out, err = bytearray(), bytearray()
    async for stream, data in process.output():
        (out if stream == "stdout" else err).extend(data)
    return bytes(out), bytes(err), (await process.wait()).exit_code


async def test_exec_runs_in_an_image_without_python(sandbox: LiveSandbox) -> None:
    out, err, code = await run(sandbox, ["/bin/sh", "-c", "echo hi"])
    assert (out, err, code) == (b"hi\n", b"", 0)
    # Nothing of Python is in the image: the agent is the runtime's.
    out, _, code = await run(sandbox, ["sh", "-c", "command -v python3 || echo none"])
    assert (out, code) == (b"none\n", 0)
    out, _, _ = await run(sandbox, ["sh", "-c", 'tr "\\0" " " < /proc/$PPID/cmdline'])
    assert out.startswith(f"{MOUNT_POINT}/bin/python3 ".encode()), out
    out, _, _ = await run(sandbox, ["sh", "-c", "echo $GREETING"])
    assert out == b"hello\n"


async def test_files_are_written_read_and_listed(sandbox: LiveSandbox) -> None:
    data = os.urandom(256 * 1024 + 3)
    assert await sandbox.link.write_file("data/blob.bin", data) == len(data)
    length, chunks = await sandbox.link.read_file("data/blob.bin")
    assert length == len(data)
    assert b"".join([chunk async for chunk in chunks]) == data
    listing = await sandbox.link.call("list", path="data")
    assert [(e["name"], e["type"], e["size"]) for e in listing] == [("blob.bin", "file", len(data))]
    out, _, code = await run(sandbox, ["wc", "-c", "data/blob.bin"])
    assert (out.split()[0], code) == (str(len(data)).encode(), 0)


async def test_the_runtime_is_read_only_and_only_itself(sandbox: LiveSandbox) -> None:
    for path in (f"{MOUNT_POINT}/planted", f"{MOUNT_POINT}/bin/python3"):
        with pytest.raises(GuestError) as refused:
            await sandbox.link.write_file(path, b"x")
        assert refused.value.errno in ("EROFS", "EACCES"), path
    _, err, code = await run(sandbox, ["sh", "-c", f"echo x > {MOUNT_POINT}/lib/libc.so.6"])
    assert code != 0
    assert b"Read-only file system" in err or b"Permission denied" in err, err
    _, _, code = await run(sandbox, ["mkdir", f"{MOUNT_POINT}/new"])
    assert code != 0
    # Its own files, nothing else of the host's.
    listing = await sandbox.link.call("list", path=MOUNT_POINT)
    assert sorted(e["name"] for e in listing) == ["bin", "lib", "libexec", "tools"]
    listing = await sandbox.link.call("list", path="/.treadle")
    assert [e["name"] for e in listing] == ["agent"]


async def test_what_exec_starts_inherits_nothing_of_the_runtime(sandbox: LiveSandbox) -> None:
    out, _, code = await run(sandbox, ["env"])
    assert code == 0
    env = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    assert env["GREETING"] == "hello"
    assert {name for name in RUNTIME_VARIABLES if name in env} == set()
    assert [value for value in env.values() if "treadle/agent" in value] == []


@pytest.mark.parametrize("param", runtime_params(), ids=lambda p: str(p[0]))
async def test_host_program_children_load_nothing_of_the_runtime(
    param: tuple[Tier, dict[str, Any]], tmp_path: Path
) -> None:
    """Without an image (the host's programs) too, in every tier: the agent runs on the
    runtime, and a dynamically linked program it starts loads the host's libraries, not
    the runtime's (the library path was the loader's option, not an inherited variable)."""
    sandbox = await start(param, tmp_path)
    try:
        runtime_dir = "treadle/agent" if param[0] is not Tier.PROCESS else "agent-runtime"
        out, _, _ = await run(sandbox, ["sh", "-c", 'tr "\\0" " " < /proc/$PPID/cmdline'])
        assert runtime_dir in out.decode().split()[0], out
        out, _, code = await run(sandbox, ["/bin/cat", "/proc/self/maps"])
        assert code == 0
        assert b"libc" in out  # a dynamically linked program, as a check of the check
        assert runtime_dir.encode() not in out
        out, _, _ = await run(sandbox, ["env"])
        assert [n for n in RUNTIME_VARIABLES if f"\n{n}=".encode() in b"\n" + out] == []
        assert runtime_dir.encode() not in out
    finally:
        await sandbox.stop(grace_s=1)


async def test_an_image_cannot_point_the_runtime_s_mount_at_the_host(
    tier: tuple[Tier, dict[str, Any]],
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    hostile: tuple[str, Path],
) -> None:
    image, target = hostile
    with pytest.raises(ValueError, match=r"/\.treadle/agent other than as directories"):
        await start(tier, tmp_path, image=image, insecure=[registry.host])
    assert list(target.iterdir()) == []  # nothing made on the host through the link


async def test_an_image_s_device_nodes_open_nothing(
    tier: tuple[Tier, dict[str, Any]],
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    with_device: str,
) -> None:
    sandbox = await start(tier, tmp_path, image=with_device, insecure=[registry.host])
    try:
        out, _, _ = await run(sandbox, ["sh", "-c", "head -c 3 /disk | wc -c"])
        # Refused: by the devices cgroup's allowlist in the oci tiers, by gVisor's own /dev,
        # by the guest's mount of the image (nodev) in a microVM.
        assert out.split() == [b"0"]
    finally:
        await sandbox.stop(grace_s=1)
