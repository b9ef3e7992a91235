"""The guest image's pieces that need no VM: the initramfs archive, read back by busybox's
own cpio, and the kernel found inside a compressed boot image."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from treadle.shuttle.live import agent_runtime
from treadle.shuttle.microvm import cpio, image, qemu
from treadle.shuttle.microvm.image import module_depends
from treadle.shuttle.microvm.kernel import KernelError, vmlinux

BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")
def test_an_archive_unpacks_as_written(tmp_path: Path) -> None:
    entries = [
        cpio.Entry("bin", stat.S_IFDIR | 0o755),
        cpio.Entry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        cpio.Entry("bin/link", stat.S_IFLNK | 0o777, b"tool"),
        cpio.Entry("odd", stat.S_IFREG | 0o600, b"x" * 4097),  # not a multiple of 4
    ]
    archive = io.BytesIO()
    cpio.write(entries, archive)
    assert BUSYBOX is not None
    subprocess.run(
        [BUSYBOX, "cpio", "-i", "-d"], input=archive.getvalue(), cwd=tmp_path, check=True
    )
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755
    assert (tmp_path / "bin/link").readlink() == Path("tool")
    assert (tmp_path / "odd").read_bytes() == b"x" * 4097


@pytest.mark.parametrize("name", ["", "/", "../etc/passwd", "a/../../b"])
def test_names_that_would_leave_the_archive_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        cpio.write([cpio.Entry(name, stat.S_IFREG | 0o644, b"")], io.BytesIO())


def test_devices_are_refused() -> None:
    with pytest.raises(ValueError):
        cpio.write([cpio.Entry("dev/null", stat.S_IFCHR | 0o666)], io.BytesIO())


ELF = b"\x7fELF" + bytes(range(256)) * 64


@pytest.mark.parametrize(
    "compress",
    [
        lambda data: lzma.compress(data, format=lzma.FORMAT_XZ),
        gzip.compress,
    ],
    ids=["xz", "gzip"],
)
def test_the_kernel_is_found_inside_its_boot_image(compress: object) -> None:
    assert callable(compress)
    # A bzImage: a setup header, the decompressor, then the payload and a trailer.
    boot = b"MZ" + b"\0" * 1000 + compress(ELF) + b"\0" * 64
    assert vmlinux(boot) == ELF
    assert vmlinux(ELF) == ELF  # already uncompressed


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_an_lz4_kernel_is_found_with_its_trailer_ignored() -> None:
    payload = subprocess.run(["lz4", "-l", "-c"], input=ELF, capture_output=True, check=True).stdout
    assert vmlinux(b"MZ" + b"\0" * 500 + payload + b"trailer") == ELF


def test_an_image_without_a_kernel_is_refused() -> None:
    with pytest.raises(KernelError):
        vmlinux(b"MZ" + b"\0" * 100 + b"\xfd7zXZ\x00 but not xz")


def test_a_module_s_dependencies_come_from_its_modinfo() -> None:
    module = b"\x7fELF...\0license=GPL\0depends=virtio,virtio-ring\0vermagic=6.1\0"
    assert module_depends(module) == ["virtio", "virtio_ring"]
    assert module_depends(b"\x7fELF\0license=GPL\0") == []


@pytest.mark.parametrize("module", ["vmboot", "vsock_stdio"])
def test_the_guest_s_programs_run_on_the_agent_runtime_s_python(
    module: str, tmp_path: Path
) -> None:
    """The guest runs them on the agent runtime's Python, which lacks much of the standard
    library (`typing` among it): each must at least start there and fail with its own word."""
    runtime = agent_runtime.ensure()
    source = resources.files("treadle.guest").joinpath(f"{module}.py").read_text()
    done = subprocess.run(
        [*runtime.argv(str(runtime.path)), "-I", "-S", "-c", source],
        env={"TREADLE_AGENT_CONFIG": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Traceback" not in done.stderr and "Error" not in done.stderr.split(":")[0]
    assert done.returncode != 0 and done.stderr.startswith(("treadle:", "usage:"))


def test_vmboot_runs_the_named_program_with_exactly_its_environment(tmp_path: Path) -> None:
    runtime = agent_runtime.ensure()
    config = tmp_path / "config"
    home = tmp_path / "home"
    config.write_bytes(
        json.dumps(
            {
                "argv": ["/bin/sh", "-c", 'echo "$GREETING $(pwd) $(env | wc -l)"'],
                "env": {"GREETING": "hi", "HOME": str(home)},
                "home": str(home),
            }
        ).encode()
        + b"\0" * 512
    )
    source = resources.files("treadle.guest").joinpath("vmboot.py").read_text()
    done = subprocess.run(
        [*runtime.argv(str(runtime.path)), "-I", "-S", "-c", source],
        env={"TREADLE_AGENT_CONFIG": str(config), "LEAK": "x"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout.split()) == (0, ["hi", str(home), "3"]), done.stderr


@pytest.mark.parametrize(
    ("cpuinfo", "khz"),
    [
        ("cpu MHz\t\t: 2596.126\nflags\t\t: fpu tsc constant_tsc hypervisor\n" * 2, 2596126),
        # Cores at different clocks: the reported rate is not the TSC's.
        ("cpu MHz : 2596.1\nflags : constant_tsc hypervisor\ncpu MHz : 1400.0\n", None),
        ("cpu MHz : 2596.1\nflags : constant_tsc\n", None),  # bare metal: the current clock
        ("cpu MHz : 2596.1\nflags : hypervisor\n", None),  # a TSC whose rate changes
        ("cpu MHz : nan\nflags : constant_tsc hypervisor\n", None),
        ("cpu MHz : 1e308\nflags : constant_tsc hypervisor\n", None),
        ("", None),
    ],
)
def test_the_guest_is_told_the_tsc_rate_only_where_the_host_says_it(
    cpuinfo: str, khz: int | None
) -> None:
    assert qemu.tsc_khz(cpuinfo) == khz


def test_kvm_is_used_only_where_a_workload_s_vmm_may_open_it(tmp_path: Path) -> None:
    # A workload's VMM runs as the workload's own ids, in no group of the host's.
    assert qemu.kvm_open_to_workloads("/dev/null")  # a character device open to all
    regular = tmp_path / "kvm"
    regular.touch(0o666)
    regular.chmod(0o666)
    assert not qemu.kvm_open_to_workloads(str(regular))  # not a device
    assert not qemu.kvm_open_to_workloads(str(tmp_path / "missing"))


def test_images_no_shuttle_asked_for_in_a_week_are_pruned(tmp_path: Path) -> None:
    now = 1_000_000_000.0
    current, old, recent = "a" * 24, "b" * 24, "c" * 24
    staging = f".{'d' * 24}-x1y2"  # a build that never finished
    for name, age_days in ((current, 30), (old, 8), (recent, 6), (staging, 9), ("other", 30)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "initrd").write_bytes(b"x")
        os.utime(tmp_path / name, (now - age_days * 86400, now - age_days * 86400))
    (tmp_path / ("e" * 24)).symlink_to(tmp_path / "other")  # a link is never followed

    removed = image.prune(tmp_path, current, now)

    assert sorted(removed) == sorted([staging, old])
    # Only what a build names is pruned: "other" is not the image root's.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [current, recent, "e" * 24, "other"]
    )
    assert (tmp_path / "other" / "initrd").exists()
    assert (tmp_path / current).stat().st_mtime == now  # marked in use: kept a week more


@pytest.mark.skipif(os.geteuid() != 0, reason="sets the process's capabilities, as root")
def test_vmboot_runs_this_interpreter_s_program_in_its_own_process(tmp_path: Path) -> None:
    """The guest agent (the same interpreter and options, with source to run) is loaded and
    run by vmboot itself, with exactly its environment and as many capabilities as an
    executed program would hold; any other program is executed as before (above)."""
    runtime = agent_runtime.ensure()
    command = [*runtime.argv(str(runtime.path)), "-I", "-S", "-c"]
    program = (
        "import os, sys\n"
        "def main():\n"
        "    status = open('/proc/self/status').read().split('\\n')\n"
        "    caps = [line.split()[1] for line in status if line.startswith('CapPrm')]\n"
        "    print(os.getpid(), os.environ['GREETING'], len(os.environ), sys.argv, caps[0])\n"
        "print('not as a program: nothing runs on load')\n"
    )
    config = tmp_path / "config"
    config.write_bytes(
        json.dumps(
            {"argv": [*command, program], "env": {"GREETING": "hi"}, "capabilities": [0, 7]}
        ).encode()
        + b"\0" * 512
    )
    source = resources.files("treadle.guest").joinpath("vmboot.py").read_text()
    vmboot = subprocess.Popen(
        [*command, source],
        env={"TREADLE_AGENT_CONFIG": str(config), "LEAK": "x"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = vmboot.communicate(timeout=30)
    assert vmboot.returncode == 0, err
    loaded, ran = out.splitlines()
    assert loaded == "not as a program: nothing runs on load"
    # Its own process, its own environment only, and CAP_CHOWN and CAP_SETUID alone.
    assert ran.split() == [str(vmboot.pid), "hi", "1", "['-c']", f"{(1 << 0) | (1 << 7):016x}"]


def test_qemu_shares_an_image_root_the_runtime_beside_it_and_a_scratch_disk() -> None:
    guest = image.GuestImage(Path("/g/vmlinux"), Path("/g/initrd"), "d")
    argv = qemu.argv(
        "qemu",
        guest,
        None,
        memory_mib=256,
        cpus=1,
        accel="kvm",
        config_fd=100,
        root_share=True,
        home="/work",
        root="/.treadle/image",
        binds=[("/.treadle/agent", "/.treadle/agent")],
        scratch_fd=101,
    )
    line = " ".join(argv)
    assert "local,id=root,path=/.treadle/image,security_model=none,readonly=on" in line
    assert "local,id=bind0,path=/.treadle/agent,security_model=none,readonly=on" in line
    assert "fd=101,set=2" in line and "serial=treadle-scratch" in line
    cmdline = argv[argv.index("-append") + 1].split()
    assert {"treadle.binds=/.treadle/agent", "treadle.scratch=1", "treadle.home=/work"} <= set(
        cmdline
    )
    for target in ("/a b", "/a,b", "relative", "/$(x)"):
        with pytest.raises(ValueError, match="cannot share"):
            qemu.argv(
                "qemu", guest, None, memory_mib=256, cpus=1, accel="kvm", root_share=True,
                binds=[("/x", target)],
            )  # fmt: skip
