"""Booting a microVM guest to its agent, next to QEMU booting the same kernel alone, in one
run (software emulation where KVM does not boot a guest, as on this kind of host).

    .venv/bin/python bench/microvm.py [-n 10] [--memory 256]

Needs the guest image's kernel package (scripts/build-guest) and QEMU. For each of N runs,
one after another:

  * `boot_to_ready`: `qemu.boot` (QEMU spawned, its agent channel connected) until the guest
    agent's `ready` frame: what a microvm sandbox's start waits for;
  * `echo_13`: then `/bin/sh -c 'echo 13'` through the agent, request to exit;
  * `qemu_rss_mib`: QEMU's resident memory once the agent is ready (the host memory one idle
    VM costs, its guest's use included);
  * `raw_qemu_poweroff`: QEMU with the same kernel, initramfs and options but busybox's
    `poweroff -f` as the guest's first program, spawn to exit: the kernel's boot and QEMU's
    own start and end, with no module, agent or Python;
  * `sandbox_cold`: a node's sandbox start (`LiveSandbox.start`: QEMU in the namespace
    tier's jail, the config disk, `vmboot`'s confinement, the agent) until its `ready`;
  * `sandbox_warm`: the same start taking a VM from a warm pool (one per shape, refilled
    between runs, not timed): the settings handed over, until the agent's `ready`;
  * `waiting_rss_mib`: QEMU's resident memory for a VM waiting in the pool.

The sandbox figures need the namespace tier (bubblewrap; run as root for the jail's ids).

Prints p50/p99/mean in ms as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from treadle.domain.resources import Resources, Tier
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.live.link import GuestLink
from treadle.shuttle.live.pool import WarmPool
from treadle.shuttle.microvm import qemu
from treadle.shuttle.microvm.image import build, find_package
from treadle.shuttle.microvm.launcher import MicrovmLauncher
from treadle.shuttle.runtimes import available_runtimes
from treadle.shuttle.settings import ShuttleSettings


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(ordered[len(ordered) // 2], 1),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(image: Any, root: Path, memory: int, accel: qemu.Accel) -> dict[str, float]:
    started = time.perf_counter()
    vm = await qemu.boot(image, root / f"vm-{time.monotonic_ns()}", memory_mib=memory, accel=accel)
    fd = vm.channel.fileno()
    link = GuestLink(os.dup(fd), os.dup(fd), on_broken=lambda why: None)
    try:
        await asyncio.wait_for(link.ready(), 120)
        ready = time.perf_counter()
        rss = rss_mib(vm.process.pid)
        process = await link.exec(["/bin/sh", "-c", "echo 13"])
        async for _ in process.output():
            pass
        await process.wait()
        done = time.perf_counter()
    finally:
        link.close()
        await vm.close()
    return {
        "boot_to_ready": (ready - started) * 1000,
        "echo_13": (done - ready) * 1000,
        "qemu_rss_mib": rss,
    }


def raw(image: Any, root: Path, memory: int, accel: qemu.Accel) -> float:
    program = shutil.which("qemu-system-x86_64")
    assert program is not None
    argv = qemu.argv(
        program,
        image,
        root / "unused.sock",
        memory_mib=memory,
        cpus=1,
        accel=accel,
        kernel_args="rdinit=/bin/busybox -- poweroff -f",
    )
    # No agent channel to connect: the chardev would wait for a listener.
    at = argv.index(f"socket,id=agent,path={root / 'unused.sock'}")
    argv[at] = "null,id=agent"
    started = time.perf_counter()
    subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=120
    )
    return (time.perf_counter() - started) * 1000


async def sandboxes(
    image: Any, root: Path, n: int, memory: int, accel: qemu.Accel
) -> dict[str, list[float]]:
    settings = ShuttleSettings(weaver_url="http://127.0.0.1:9", home=root / "node")
    jail = available_runtimes(settings)[Tier.NAMESPACE]
    launcher = MicrovmLauncher(jail.launcher, image, accel=accel)  # type: ignore[attr-defined]
    pool = WarmPool(launcher, per_shape=1, budget_mib=1 << 16, workdir=root)
    spec = SandboxSpec(
        id="sbx",
        incarnation=1,
        tenant_id="tn",
        resources=Resources(cpu_millicores=1000, memory_mib=memory),
        isolation=Tier.MICROVM,
        env={"WHO": "bench"},
    )
    times: dict[str, list[float]] = {"cold": [], "warm": [], "rss": []}
    try:
        for kind in ("cold", "warm"):
            launcher.pool = pool if kind == "warm" else None
            for _ in range(n + (kind == "warm")):  # the first warm start fills the pool
                if kind == "warm":
                    await pool.filled()
                    times["rss"] += [rss_mib(pid) for pid in _qemu_pids()]
                started = time.perf_counter()
                sandbox = await LiveSandbox.start(launcher, spec, root)
                times[kind].append((time.perf_counter() - started) * 1000)
                await sandbox.stop(grace_s=0)
            if kind == "warm":
                times["warm"].pop(0)
                assert pool.stats().hits == n, pool.stats()
    finally:
        await pool.close()
    return times


def _qemu_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                program = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if program.endswith(b"qemu-system-x86_64"):
                found.append(int(entry))
    return found


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument("--memory", type=int, default=256)
    args = parser.parse_args()
    package = find_package()
    if package is None:
        raise SystemExit("no kernel package: run scripts/build-guest")
    root = Path(tempfile.mkdtemp(prefix="treadle-bench-microvm-"))
    try:
        image = build(package, root / "images")
        accel = await qemu.probe(image, root / "probe")
        runs = [await one(image, root, args.memory, accel) for _ in range(args.n)]
        raws = [raw(image, root, args.memory, accel) for _ in range(args.n)]
        # Where a node keeps it: its jailed VMMs read it as the workloads' own ids.
        node = await sandboxes(build(package), root, args.n, args.memory, accel)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    boot = summary([r["boot_to_ready"] for r in runs])
    report = {
        "accel": accel,
        "runs": args.n,
        "memory_mib": args.memory,
        "image_build_s": round(image.seconds, 2),
        "boot_to_ready_ms": boot,
        "echo_13_ms": summary([r["echo_13"] for r in runs]),
        "qemu_rss_mib": summary([r["qemu_rss_mib"] for r in runs]),
        "raw_qemu_poweroff_ms": summary(raws),
        "ready_over_raw_p50": round(boot["p50"] / summary(raws)["p50"], 2),
        "sandbox_cold_ms": summary(node["cold"]),
        "sandbox_warm_ms": summary(node["warm"]),
        "warm_over_cold_p50": round(summary(node["warm"])["p50"] / summary(node["cold"])["p50"], 3),
        "waiting_rss_mib": summary(node["rss"]),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
