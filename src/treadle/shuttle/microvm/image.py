"""The guest image: a kernel and an initramfs, built on the node from Debian packages and
the node's own files, cached by a hash of everything they are made of.

    <state root>/microvm/<digest>/vmlinux    the kernel, uncompressed (`kernel.vmlinux`)
    <state root>/microvm/<digest>/initrd     a newc cpio, uncompressed (faster to unpack
                                             under software emulation than a gzipped one)

The initramfs holds busybox (Debian's `busybox-static`), the kernel's virtio modules, `/init`
(`INIT`), the guest agent (`treadle.guest.agent`) and the Python it runs on (the node's agent
runtime, `treadle.shuttle.live.agent_runtime`, at its usual mount point). Nothing is
downloaded here: the kernel package is fetched by the node's set-up (`scripts/build-guest`).

Building is atomic, as the agent runtime's: a finished directory is renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from treadle.guest.vsock_stdio import PORT as VSOCK_PORT
from treadle.shuttle.live import agent_runtime
from treadle.shuttle.microvm import cpio
from treadle.shuttle.microvm.kernel import vmlinux
from treadle.shuttle.sandbox.state import private_dir, state_root

__all__ = [
    "BINDS_ARG",
    "BIND_TAG",
    "CHANNEL_ARG",
    "CONFIG_ARG",
    "CONFIG_SERIAL",
    "HOME_ARG",
    "INIT",
    "PORT_NAME",
    "ROOT_ARG",
    "ROOT_TAG",
    "SCRATCH_ARG",
    "SCRATCH_SERIAL",
    "GuestImage",
    "build",
    "find_package",
    "module_depends",
    "prune",
    "touch",
]

# The layout's version: a change of this module's output changes every image's digest.
_FORMAT = 3
# The virtio-serial port the guest agent talks on, found in the guest by this name.
PORT_NAME = "treadle.agent"
# On the kernel's command line where a config disk is attached (the first virtio disk):
# JSON, padded with NULs, that the agent reads its environment from.
CONFIG_ARG = "treadle.config=vda"
# The serial QEMU gives the config disk, which the guest finds it by (Firecracker's drives
# have none: the config disk is then the first).
CONFIG_SERIAL = "treadle-config"
# On the kernel's command line where a scratch disk is attached (serial `SCRATCH_SERIAL`):
# an ext4 file system, made by the node, that holds the workload's home, /tmp and /dev/shm.
SCRATCH_ARG = "treadle.scratch=1"
SCRATCH_SERIAL = "treadle-scratch"
# The modules the guest needs; what they depend on comes along, loaded first (in the order
# `/lib/modules/order` lists, found from each module's own `depends=`).
MODULES = (
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    "ext4",
    # ext4 asks the crypto API for crc32c by name when it mounts, whatever the features.
    "crc32c_generic",
)
# On the kernel's command line where the agent's channel is a vsock port (Firecracker's,
# which has no virtio-serial): `treadle.guest.vsock_stdio` takes the host's connection.
CHANNEL_ARG = "treadle.channel=vsock"
# On the kernel's command line where the workload's root is the VMM's view of the host's
# programs, shared read-only over 9p (tag `ROOT_TAG`): `treadle.root=9p treadle.home=PATH`.
ROOT_ARG = "treadle.root=9p"
ROOT_TAG = "root"
HOME_ARG = "treadle.home="
# Host directories shared read-only at their places in a root that does not hold them (an
# image's): `treadle.binds=/a,/b`, their 9p tags `bind0`, `bind1`, ...
BINDS_ARG = "treadle.binds="
BIND_TAG = "bind"
# How long an image no Shuttle asked for is kept (`prune`).
UNUSED_FOR_S = 7 * 24 * 3600
# What `build` names an image directory, and a build's staging directory: nothing else
# under the root is pruned.
_IMAGE_NAME = re.compile(r"\.?[0-9a-f]{24}(-[A-Za-z0-9_]+)?")
# Where `scripts/build-guest` leaves the kernel package.
PACKAGE_DIR = Path("/var/cache/treadle/guest")
_AGENT = "/.treadle/guest-agent.py"
_BOOT = "/.treadle/vmboot.py"
_VSOCK_STDIO = "/.treadle/vsock-stdio.py"

# PID 1 of the guest: the file systems the agent needs, the modules, the agent's port; then
# the agent itself, as PID 1, with its port as stdin and stdout. The port opens once, so one
# descriptor serves both. Its end ends the guest: the kernel then panics, and QEMU, told
# not to reboot, exits.
INIT = f"""#!/bin/busybox sh
export PATH=/bin
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=1777 tmp /tmp
for module in $(cat /lib/modules/order); do
  # Firecracker names its virtio-mmio devices on the command line, where busybox's insmod
  # does not look for a module's parameters.
  args=
  if [ $module = virtio_mmio ]; then
    args=$(tr ' ' '\\n' < /proc/cmdline | sed -n 's/^virtio_mmio\\.//p')
  fi
  insmod /lib/modules/$module.ko $args || echo "treadle: cannot load $module" >&2
done
# The agent's channel: the virtio-serial port, or (Firecracker) a vsock port whose one
# connection `vsock_stdio` makes the agent's stdin and stdout before it executes the agent.
set --
if grep -q "{CHANNEL_ARG}" /proc/cmdline; then
  set -- @AGENT@ -I -S -c "$(cat {_VSOCK_STDIO})" {VSOCK_PORT}
fi
port=
tries=0
while [ $# -eq 0 ] && [ -z "$port" ] && [ $tries -lt 100000 ]; do
  for found in /sys/class/virtio-ports/*; do
    if [ -r "$found/name" ] && [ "$(cat "$found/name")" = {PORT_NAME} ]; then
      port=/dev/${{found##*/}}
    fi
  done
  tries=$((tries + 1))
done
while [ -n "$port" ] && [ ! -e "$port" ] && [ $tries -lt 200000 ]; do tries=$((tries + 1)); done
if [ $# -eq 0 ] && [ -z "$port" ]; then
  echo "treadle: no virtio port named {PORT_NAME}" >&2
  poweroff -f
fi
# Disks by their serial where they have one (QEMU's), else the config disk is the first.
disk() {{
  for found in /sys/block/vd*; do
    if [ "$(cat "$found/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${{found##*/}}"; fi
  done
}}
if grep -q "{CONFIG_ARG}" /proc/cmdline; then
  while [ ! -b /dev/vda ] && [ $tries -lt 300000 ]; do tries=$((tries + 1)); done
  config=$(disk {CONFIG_SERIAL})
  export TREADLE_AGENT_CONFIG=${{config:-/dev/vda}}
fi
scratch=
if grep -q "{SCRATCH_ARG}" /proc/cmdline; then
  while [ -z "$scratch" ] && [ $tries -lt 400000 ]; do
    scratch=$(disk {SCRATCH_SERIAL}); tries=$((tries + 1))
  done
  mkdir -p /scratch
  mount -t ext4 -o nosuid,nodev "$scratch" /scratch || poweroff -f
  mkdir -p /scratch/home /scratch/tmp /scratch/shm
  chmod 1777 /scratch/tmp /scratch/shm
fi
# A writable place of the workload's: on its scratch disk where it has one, else a tmpfs.
place() {{
  if [ -n "$scratch" ]; then
    mount --bind "/scratch/$1" "$2"
  else
    mount -t tmpfs -o "mode=$3,nosuid,nodev" "$1" "$2"
  fi
}}
ip link set lo up
if [ $# -eq 0 ]; then exec 3<>"$port"; else exec 3<>/dev/console; fi
# With a config disk, the node names the program (`treadle.guest.vmboot` reads it, confines
# the guest and executes it); without one, the image's own agent runs.
program="$(cat {_AGENT})"
if [ -n "$TREADLE_AGENT_CONFIG" ]; then program="$(cat {_BOOT})"; fi
if grep -q "{ROOT_ARG}" /proc/cmdline; then
  # The workload's root: the host's programs, read-only, and its own writable places.
  home=$(sed -n 's/.*{HOME_ARG}\\([^ ]*\\).*/\\1/p' /proc/cmdline)
  mkdir -p /root9p
  # No device nodes or set-id programs of its own (an image's): /dev is the init's.
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,nosuid,nodev,msize=262144,cache=loose \
    {ROOT_TAG} /root9p
  # A /dev of the few devices a sandbox has (as bubblewrap's), not the kernel's all.
  mount -t tmpfs -o mode=0755,nosuid,noexec,size=64k dev /root9p/dev
  for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read name major minor <<EOF_NODE
$node
EOF_NODE
    mknod -m 666 "/root9p/dev/$name" c "$major" "$minor"
  done
  mkdir -p /root9p/dev/pts /root9p/dev/shm
  ln -s /proc/self/fd /root9p/dev/fd
  ln -s /proc/self/fd/0 /root9p/dev/stdin
  ln -s /proc/self/fd/1 /root9p/dev/stdout
  ln -s /proc/self/fd/2 /root9p/dev/stderr
  mount -t proc -o nosuid,nodev,noexec proc /root9p/proc
  mount -t sysfs -o ro,nosuid,nodev,noexec sys /root9p/sys 2>/dev/null
  place tmp /root9p/tmp 1777
  mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,nosuid,noexec devpts /root9p/dev/pts
  ln -sf pts/ptmx /root9p/dev/ptmx
  place shm /root9p/dev/shm 1777
  if [ -n "$home" ] && [ -d "/root9p$home" ]; then
    place home "/root9p$home" 0755
  fi
  n=0
  options=trans=virtio,version=9p2000.L,ro,nosuid,nodev,msize=262144,cache=loose
  for target in $(sed -n 's/.*{BINDS_ARG}\\([^ ]*\\).*/\\1/p' /proc/cmdline | tr , ' '); do
    mount -t 9p -o "$options" {BIND_TAG}$n "/root9p$target"
    n=$((n + 1))
  done
  if [ -n "$TREADLE_AGENT_CONFIG" ]; then
    # vmboot enters the root itself, once it has set up what the root does not show.
    export TREADLE_ROOT=/root9p
    exec "$@" @AGENT@ -I -S -c "$program" 0<&3 1>&3 3>&-
  fi
  exec "$@" chroot /root9p @AGENT@ -I -S -c "$program" 0<&3 1>&3 3>&-
fi
exec "$@" @AGENT@ -I -S -c "$program" 0<&3 1>&3 3>&-
"""


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path
    digest: str
    built: bool = False  # made by this call (False: found ready)
    seconds: float = 0.0  # what building took


def find_package(directory: Path = PACKAGE_DIR) -> Path | None:
    """The newest kernel package `scripts/build-guest` left in `directory` (the generic
    flavour: the cloud one has no 9p)."""
    try:
        found = sorted(p for p in directory.glob("linux-image-*.deb") if "-cloud-" not in p.name)
    except OSError:
        return None
    return found[-1] if found else None


def build(
    package: Path,
    root: Path | None = None,
    busybox: str | None = None,
    agent: bytes | None = None,
) -> GuestImage:
    """The image for kernel `package` (a Debian `linux-image-*.deb`), built under `root`
    (default: the node's state root) unless there already; `agent`: another guest agent's
    source (a hostile one, in tests). Blocking: about two seconds where it builds."""
    started = time.monotonic()
    root = private_dir(root or (state_root() / "microvm"))
    runtime = agent_runtime.ensure()
    busybox_path = busybox or shutil.which("busybox") or "/bin/busybox"
    if agent is None:
        agent = resources.files("treadle.guest").joinpath("agent.py").read_bytes()
    boot = resources.files("treadle.guest").joinpath("vmboot.py").read_bytes()
    vsock_stdio = resources.files("treadle.guest").joinpath("vsock_stdio.py").read_bytes()
    init = INIT.replace("@AGENT@", " ".join(runtime.argv(agent_runtime.MOUNT_POINT))).encode()
    digest = hashlib.sha256()
    for part in (
        str(_FORMAT).encode(),
        " ".join(MODULES).encode(),
        _file_digest(package).encode(),
        runtime.path.name.encode(),
        _file_digest(Path(busybox_path)).encode(),
        agent,
        boot,
        vsock_stdio,
        init,
    ):
        digest.update(hashlib.sha256(part).digest())
    name = digest.hexdigest()[:24]
    final = root / name
    if (final / "initrd").is_file():
        prune(root, name)
        return GuestImage(final / "vmlinux", final / "initrd", name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        with tempfile.TemporaryDirectory() as unpacked:
            subprocess.run(
                ["dpkg-deb", "-x", str(package), unpacked],
                check=True,
                capture_output=True,
                timeout=300,
            )
            kernel, modules = _kernel_files(Path(unpacked))
            (staging / "vmlinux").write_bytes(vmlinux(kernel.read_bytes()))
            with open(staging / "initrd", "wb") as out:
                cpio.write(
                    _initramfs(
                        modules, Path(busybox_path), runtime.path, agent, boot, vsock_stdio, init
                    ),
                    out,
                )
        for path in (staging / "vmlinux", staging / "initrd"):
            path.chmod(0o644)
        staging.chmod(0o755)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "initrd").is_file():
                raise  # not a race lost to another builder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prune(root, name)
    return GuestImage(
        final / "vmlinux", final / "initrd", name, built=True, seconds=time.monotonic() - started
    )


def touch(image: GuestImage) -> None:
    """Mark `image` in use, so that no `prune` removes it while a Shuttle uses it."""
    with contextlib.suppress(OSError):
        os.utime(image.kernel.parent)


def prune(root: Path, keep: str, now: float | None = None) -> list[str]:
    """Mark image `keep` in use (now), and remove every other image of `root` not marked in
    `UNUSED_FOR_S`: an upgrade leaves the old image behind otherwise, 80 MiB each. A
    Shuttle keeps its own image marked as it uses it (`touch`); a VM already running holds
    what it loaded. Returns what was removed."""
    now = time.time() if now is None else now
    with contextlib.suppress(OSError):
        os.utime(root / keep, (now, now))
    removed = []
    for entry in root.iterdir():
        try:
            info = entry.lstat()
        except OSError:
            continue
        if (
            entry.name != keep
            and _IMAGE_NAME.fullmatch(entry.name)
            and stat.S_ISDIR(info.st_mode)
            and now - info.st_mtime > UNUSED_FOR_S
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _kernel_files(unpacked: Path) -> tuple[Path, dict[str, bytes]]:
    """The package's compressed kernel, and the modules the guest loads, in the order to
    load them (each after what it depends on)."""
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise FileNotFoundError("the package holds no boot/vmlinuz-*")
    found: dict[str, bytes] = {}
    for path in (unpacked / "lib" / "modules").rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        data = path.read_bytes()
        found[name] = lzma.decompress(data) if path.name.endswith(".xz") else data
    ordered: dict[str, bytes] = {}

    def load(name: str, chain: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name not in found:
            raise FileNotFoundError(f"the package holds no module {name}")
        if name in chain:
            raise ValueError(f"modules depend on each other in a circle: {chain}")
        for needed in module_depends(found[name]):
            load(needed, (*chain, name))
        ordered[name] = found[name]

    for name in MODULES:
        load(name, ())
    return kernels[-1], ordered


def module_depends(module: bytes) -> list[str]:
    """The modules a module names in its `.modinfo` (`depends=a,b`)."""
    at = module.find(b"\0depends=")
    if at < 0:
        return []
    value = module[at + len(b"\0depends=") : module.index(b"\0", at + 1)]
    return [name.replace("-", "_") for name in value.decode().split(",") if name]


def _initramfs(
    modules: dict[str, bytes],
    busybox: Path,
    runtime: Path,
    agent: bytes,
    boot: bytes,
    vsock_stdio: bytes,
    init: bytes,
) -> Iterator[cpio.Entry]:
    directory = stat.S_IFDIR | 0o755
    for name in ("bin", "lib", "lib/modules", ".treadle"):
        yield cpio.Entry(name, directory)
    yield cpio.Entry("init", stat.S_IFREG | 0o755, init)
    yield cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    for name, data in modules.items():
        yield cpio.Entry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data)
    order = "".join(f"{name}\n" for name in modules).encode()
    yield cpio.Entry("lib/modules/order", stat.S_IFREG | 0o644, order)
    yield cpio.Entry(_AGENT.lstrip("/"), stat.S_IFREG | 0o644, agent)
    yield cpio.Entry(_BOOT.lstrip("/"), stat.S_IFREG | 0o644, boot)
    yield cpio.Entry(_VSOCK_STDIO.lstrip("/"), stat.S_IFREG | 0o644, vsock_stdio)
    mount = agent_runtime.MOUNT_POINT.lstrip("/")
    yield cpio.Entry(mount, directory)
    for dirpath, dirnames, filenames in os.walk(runtime):
        dirnames.sort()
        relative = os.path.relpath(dirpath, runtime)
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            inside = os.path.normpath(os.path.join(mount, relative, name))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                yield cpio.Entry(inside, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                yield cpio.Entry(inside, directory)
            elif stat.S_ISREG(info.st_mode):
                data = Path(path).read_bytes()
                yield cpio.Entry(inside, stat.S_IFREG | stat.S_IMODE(info.st_mode), data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m treadle.shuttle.microvm.image",
        description="Build the microvm tier's guest image from a kernel package.",
    )
    parser.add_argument(
        "--package", type=Path, help=f"a linux-image-*.deb (default: newest in {PACKAGE_DIR})"
    )
    parser.add_argument("--root", type=Path, help="where images are kept (default: the node's)")
    args = parser.parse_args(argv)
    package = args.package or find_package()
    if package is None:
        print(f"no kernel package in {PACKAGE_DIR}: run scripts/build-guest", file=sys.stderr)
        return 1
    image = build(package, args.root)
    what = f"built in {image.seconds:.2f}s" if image.built else "already built"
    size = (image.kernel.stat().st_size + image.initrd.stat().st_size) / 2**20
    print(f"{image.kernel.parent} ({what}; {size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
