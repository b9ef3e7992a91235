"""Start-to-exit of `echo 13` per isolation tier, next to the raw tools.

    .venv/bin/python bench/tiers.py [-n 300] [--warmup 20] [--url URL] [--sustained 15]
        [--microvm]

For every tier this host offers (the process tier included), N runs one after another of
`/bin/echo 13` through the runtime interface: `start` → the whole output → `wait`, which is
what Shuttle does per attempt (for the namespace tier: a cgroup created, limited, joined and
removed; the sandbox's pid read and the sandbox released; its exit awaited). Then the same
without treadle, spawned with posix_spawn and reaped with waitpid:

  * `raw_echo`: `/bin/echo 13` itself, the floor of the process tier;
  * `raw_bwrap`: bubblewrap with the namespace tier's options (namespaces, mounts, tmpfs
    sizes, seccomp, environment) but no cgroup and no start handshake;
  * `raw_bwrap_minimal`: `bwrap --unshare-all --ro-bind /usr /usr ... /bin/echo 13`, the
    bare figure DESIGN §9 quotes;
  * `raw_<tool>` for crun, runc and runsc: the tool's own `run` of a bundle the tier
    generated once (same config: namespaces, mounts, seccomp, limits), in the foreground,
    without treadle's per-attempt bundle, work dir tmpfs, kill wiring and cleanup.

The oci tier is measured once per program behind it (`oci-crun`, `oci-runc`).

With `--url` (a running treadle, e.g. `treadle up`; the admin key is found as the CLI finds
it), the same run also measures what a user sees: `echo 13` invoked through the API with
`?wait`, one at a time, per tier the fleet offers (`<tier>_api`: the client's round trip,
and `<tier>_api_server`: Weaver's own open -> success), and the ratio to the raw tool
(`<tier>_api_over_raw_p50`). Functions ask for 10 millicores and 16 MiB, as a trivial
function would.

With `--sustained S`, raw bubblewrap (the same options) also runs back to back from 2 and
from 8 threads for S seconds each: the throughput the machine gives the tool alone
(`raw_bwrap_sustained`, runs/s and the machine's CPU per run), to set next to
`bench/dispatch.py --isolation namespace`, which measures the same through the API.

Prints p50/p99/mean in ms as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from treadle.client.config import load_config
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.runtimes import (
    NamespaceRuntime,
    OciRuntime,
    Runtime,
    available_runtimes,
    bwrap,
)
from treadle.shuttle.runtimes._spawn import spawn
from treadle.shuttle.runtimes.process import environment, workdir_files
from treadle.shuttle.sandbox import seccomp
from treadle.shuttle.settings import ShuttleSettings

ECHO = ["/bin/echo", "13"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "mean_ms": round(statistics.fmean(values), 2),
        "n": len(values),
    }


def echo_spec(tier: Tier, i: int = 0) -> AssignSpec:
    return AssignSpec(
        id=f"bench_{i}",
        attempt=1,
        tenant_id="tn_bench",
        function="echo",
        version=1,
        argv=ECHO,
        timeout_s=30,
        resources=Resources(),
        isolation=tier,
    )


async def through_runtime(runtime: Runtime, tier: Tier, work: Path, n: int) -> list[float]:
    times = []
    for i in range(n):
        spec = echo_spec(tier, i)
        start = time.perf_counter()
        handle = await runtime.start(spec, work / f"bench_{i}-1")
        output = b"".join([data async for _, data in handle.output()])
        status = await handle.wait()
        times.append((time.perf_counter() - start) * 1000)
        if output != b"13\n" or status.exit_code != 0:
            raise SystemExit(f"{tier}: echo 13 gave {output!r}, {status}")
    return times


def spawned(make: Callable[[], tuple[list[str], dict[int, int], list[int]]], n: int) -> list[float]:
    """`make` gives (argv, extra fds, fds to close after spawning) for one run."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        argv, extra, close = make()
        out_r, out_w = os.pipe()
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        fds = {0: null, 1: out_w, 2: out_w, 3: null, **extra}
        pid = spawn(argv[0], argv, {}, Path("/"), fds)
        for fd in (out_w, null, *close):
            os.close(fd)
        output = b""
        while chunk := os.read(out_r, 4096):
            output += chunk
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        times.append((time.perf_counter() - start) * 1000)
        if output != b"13\n" or status != 0:
            raise SystemExit(f"{argv[0]}: echo 13 gave {output!r}, status {status}")
    return times


def _busy_ticks() -> int:
    """Clock ticks the machine's CPUs spent on anything but idling, since boot."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # idle, iowait


def sustained(
    make: Callable[[], tuple[list[str], dict[int, int], list[int]]], workers: int, seconds: float
) -> dict[str, float]:
    """Runs back to back from `workers` threads for `seconds`: runs/s and CPU ms per run."""
    counts = [0] * workers
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < deadline:
            spawned(make, 1)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    busy, start = _busy_ticks(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, runs = time.monotonic() - start, sum(counts)
    cpu_ms = (_busy_ticks() - busy) * 1000 / os.sysconf("SC_CLK_TCK")
    return {
        "workers": workers,
        "runs_per_s": round(runs / elapsed, 1),
        "cpu_ms_per_run": round(cpu_ms / max(runs, 1), 2),
    }


def raw_bwrap(bwrap_path: str) -> Callable[[], tuple[list[str], dict[int, int], list[int]]]:
    spec = echo_spec(Tier.NAMESPACE)
    arch = seccomp.arch_for_machine()
    assert arch is not None
    program = seccomp.deny_filter(arch)
    binds = bwrap.host_binds()

    def make() -> tuple[list[str], dict[int, int], list[int]]:
        seccomp_r, seccomp_w = os.pipe()
        os.write(seccomp_w, program)
        os.close(seccomp_w)
        fds = {4: seccomp_r}
        files = []
        for name, data, mode in workdir_files(spec):
            fd = os.memfd_create(name)
            os.write(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
            fds[4 + len(fds)] = fd
            files.append((max(fds), name, mode))
        args = bwrap.options(
            binds=binds,
            fds=bwrap.Fds(seccomp=4, files=files),
            env=environment(spec, bwrap.WORK_DIR),
            disk_bytes=spec.resources.disk_mib << 20,
            network=False,
        )
        args_fd = os.memfd_create("args")
        os.write(args_fd, b"\0".join(a.encode() for a in args) + b"\0")
        os.lseek(args_fd, 0, os.SEEK_SET)
        number = 4 + len(fds)
        fds[number] = args_fd
        return [bwrap_path, "--args", str(number), "--", *ECHO], fds, list(fds.values())

    return make


def raw_oci(runtime: OciRuntime, work: Path) -> tuple[list[str], Callable[[], None]] | None:
    """The argv that runs one bundle the tier prepared with the tool alone, and what removes
    the bundle afterwards; None where the program's result needs a FIFO reader."""
    attempt = runtime._oci.prepare(echo_spec(runtime.tier), work)
    if attempt.launch.result is not None:
        attempt.abandon()
        return None
    # Without --keep, every tool deletes the container (and its cgroup) as it exits.
    argv = [arg for arg in attempt.launch.argv if arg != "--keep"]
    return argv, attempt.abandon


def through_api(url: str | None, tier: str, n: int, warmup: int) -> dict[str, Any] | None:
    """`echo 13` invoked with `?wait` through Weaver in `tier`, one at a time; None where no
    node of the fleet offers the tier."""
    config = load_config(url)
    headers = {"Authorization": f"Bearer {config.require_api_key()}"}
    with httpx.Client(base_url=config.url, headers=headers, timeout=60) as api:
        nodes = api.get("/v1/nodes").json()["items"]
        if not any(tier in node.get("runtimes", []) for node in nodes):
            return None
        name = f"bench-tiers-echo-{tier}"
        created = api.post(
            "/v1/functions",
            json={
                "name": name,
                "command": ECHO,
                "isolation": tier,
                "max_attempts": 1,
                "resources": {"cpu_millicores": 10, "memory_mib": 16},
            },
        )
        created.raise_for_status()
        client, server = [], []
        for i in range(warmup + n):
            start = time.perf_counter()
            execution = api.post(f"/v1/functions/{name}/invoke?wait=30", json={}).json()
            elapsed = (time.perf_counter() - start) * 1000
            if execution.get("state") != "success":
                raise SystemExit(f"{tier} through the API: {execution}")
            if i >= warmup:
                client.append(elapsed)
                stamps = {
                    key: datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                    for key, value in execution["timestamps"].items()
                }
                server.append((stamps["success"] - stamps["open"]) * 1000)
    return {"client": summary(client), "server": summary(server)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="runs per figure")
    parser.add_argument("--warmup", type=int, default=20, help="runs discarded first")
    parser.add_argument("--url", help="also measure through this treadle's API")
    parser.add_argument(
        "--sustained", type=float, metavar="S", help="also raw bubblewrap's throughput, S s"
    )
    parser.add_argument(
        "--microvm", action="store_true", help="the microvm tier too (seconds per run under TCG)"
    )
    options = parser.parse_args()

    result: dict[str, Any] = {"host": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    with tempfile.TemporaryDirectory(prefix="treadle-bench-tiers-") as scratch:
        settings = ShuttleSettings(
            weaver_url="http://127.0.0.1:9",
            home=Path(scratch),
            allow_process_runtime=True,
            microvm=options.microvm,
        )
        runtimes: dict[str, Runtime] = {
            str(tier): runtime for tier, runtime in available_runtimes(settings).items()
        }
        if "oci" in runtimes:
            for tool in ("crun", "runc"):
                found = available_runtimes(settings.model_copy(update={"oci_tool": tool}))
                if Tier.OCI in found:
                    runtimes[f"oci-{tool}"] = found[Tier.OCI]
            del runtimes["oci"]
        for name, runtime in sorted(runtimes.items(), key=lambda i: (i[1].tier.strength, i[0])):
            tier = runtime.tier
            asyncio.run(through_runtime(runtime, tier, Path(scratch), options.warmup))
            times = asyncio.run(through_runtime(runtime, tier, Path(scratch), options.n))
            result[f"{name}_runtime"] = summary(times)
            if isinstance(runtime, (NamespaceRuntime, OciRuntime)):
                result[f"{name}_runtime"]["limits"] = runtime.limits
            if isinstance(runtime, OciRuntime):
                raw = raw_oci(runtime, Path(scratch) / "raw")
                if raw is None:
                    continue
                argv, remove = raw
                try:
                    spawned(lambda: (argv, {}, []), options.warmup)  # noqa: B023
                    times = spawned(lambda: (argv, {}, []), options.n)  # noqa: B023
                finally:
                    remove()
                result[f"raw_{runtime.tool.name}"] = summary(times)
                result[f"{name}_over_raw_p50"] = round(
                    result[f"{name}_runtime"]["p50_ms"]
                    / result[f"raw_{runtime.tool.name}"]["p50_ms"],
                    2,
                )

    echo = lambda: (ECHO, {}, [])  # noqa: E731
    spawned(echo, options.warmup)
    result["raw_echo"] = summary(spawned(echo, options.n))
    bwrap_path = shutil.which("bwrap")
    if bwrap_path is not None:
        same = raw_bwrap(bwrap_path)
        spawned(same, options.warmup)
        result["raw_bwrap"] = summary(spawned(same, options.n))
        if options.sustained:
            result["raw_bwrap_sustained"] = [
                sustained(same, workers, options.sustained) for workers in (2, 8)
            ]
        minimal = [bwrap_path, "--unshare-all", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "sbin"):
            path = Path("/", name)
            if path.is_symlink():
                minimal += ["--symlink", os.readlink(path), f"/{name}"]
        minimal += ["--proc", "/proc", "--dev", "/dev", "--", *ECHO]
        bare = lambda: (minimal, {}, [])  # noqa: E731
        spawned(bare, options.warmup)
        result["raw_bwrap_minimal"] = summary(spawned(bare, options.n))
    if "namespace_runtime" in result and "raw_bwrap" in result:
        result["namespace_over_raw_bwrap_p50"] = round(
            result["namespace_runtime"]["p50_ms"] / result["raw_bwrap"]["p50_ms"], 2
        )
    if options.url is not None:
        raw_of = {
            "process": "raw_echo",
            "namespace": "raw_bwrap",
            "oci": "raw_crun",
            "microvm": "microvm_runtime",  # its raw QEMU boot: bench/microvm.py
        }
        for tier in ("process", "namespace", "oci", "gvisor", "microvm"):
            if tier == "microvm" and not options.microvm:
                continue
            measured = through_api(options.url, tier, options.n, options.warmup)
            if measured is None:
                continue
            result[f"{tier}_api"] = measured["client"]
            result[f"{tier}_api_server"] = measured["server"]
            raw = raw_of.get(tier)
            if raw in result:
                result[f"{tier}_api_over_raw_p50"] = round(
                    measured["client"]["p50_ms"] / result[raw]["p50_ms"], 2
                )
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
