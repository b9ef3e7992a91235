"""Sandboxes through the API and alone, next to the raw floor.

    .venv/bin/python bench/sandboxes.py [--url URL] [-n 30] [--burst 50] [--execs 200]
                                        [--density 100] [--isolation namespace]

Against a running treadle (e.g. `treadle up`; the admin key is found as the CLI finds it),
sandboxes asking for 10 millicores, 64 MiB and 64 MiB of disk (so that the node's capacity
is not what limits the burst and the density):

  * `create_to_first_exec`: create, then exec `true` (which waits for the sandbox to run),
    one after another, `-n` times: what an agent waits for before its first command;
  * `burst`: `--burst` creates at once, each followed by its first exec;
  * `exec_round_trip`: `true` run `--execs` times in one running sandbox, through the API,
    next to the same through the node's own layer alone (`LiveSandbox`, in this process,
    same tier) and to `posix_spawn` of `/bin/true` (the floor of a process per command);
  * `pause_resume`: pause then resume through the API, each until the status says so
    (polled, one GET after another), and the freeze and thaw alone (`LiveSandbox`);
  * `density`: `--density` idle sandboxes at once: the host memory they take (MemAvailable
    before and after, over the count) and the CPU the idle fleet uses over 10 s.
  * `file_1mib_write`/`file_1mib_read`: a 1 MiB file written then read through the API, and
    `upload_32mib_mb_s`: a 32 MiB upload (streamed, past the body limit) in MB/s;
  * `port_get_api`: GET of a small file from `python3 -m http.server` inside the sandbox,
    through Weaver's port proxy, next to `port_get_direct`: the same server on the host's
    loopback, fetched directly (the same client, one connection per request);
  * `attach_api`: attach to a running process (WebSocket open to its `started` message).

Prints JSON: p50/p95/p99 in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from treadle.client.config import load_config
from treadle.domain.resources import Resources, Tier
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.runtimes import available_runtimes
from treadle.shuttle.runtimes._spawn import spawn
from treadle.shuttle.runtimes.process import ProcessRuntime
from treadle.shuttle.settings import ShuttleSettings

SMALL = {"cpu_millicores": 10, "memory_mib": 64, "disk_mib": 64}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "mean_ms": round(statistics.fmean(values), 2),
        "n": len(values),
    }


async def create_and_first_exec(api: httpx.AsyncClient, isolation: str | None) -> tuple[str, float]:
    body: dict[str, Any] = {"resources": SMALL, "timeout_s": 600}
    if isolation:
        body["isolation"] = isolation
    start = time.perf_counter()
    created = await api.post("/v1/sandboxes", json=body)
    created.raise_for_status()
    sandbox_id = created.json()["id"]
    ran = await api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": ["true"]})
    ran.raise_for_status()
    elapsed = (time.perf_counter() - start) * 1000
    if ran.json()["exit_code"] != 0:
        raise SystemExit(f"exec in {sandbox_id}: {ran.text}")
    return sandbox_id, elapsed


async def until(api: httpx.AsyncClient, sandbox_id: str, status: str) -> None:
    # Each GET is a round trip (~1-2 ms): polling needs no sleep of its own.
    while True:
        seen = (await api.get(f"/v1/sandboxes/{sandbox_id}")).json()["status"]
        if seen == status:
            return


async def through_api(api: httpx.AsyncClient, options: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    iso = options.isolation
    warm, _ = await create_and_first_exec(api, iso)
    await api.delete(f"/v1/sandboxes/{warm}")
    times = []
    for _ in range(options.n):
        sandbox_id, elapsed = await create_and_first_exec(api, iso)
        times.append(elapsed)
        await api.delete(f"/v1/sandboxes/{sandbox_id}")
    result["create_to_first_exec"] = summary(times)

    started = time.perf_counter()
    burst = await asyncio.gather(*(create_and_first_exec(api, iso) for _ in range(options.burst)))
    result["burst"] = {
        **summary([elapsed for _, elapsed in burst]),
        "size": options.burst,
        "wall_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    for sandbox_id, _ in burst:
        await api.delete(f"/v1/sandboxes/{sandbox_id}")

    sandbox_id, _ = await create_and_first_exec(api, iso)
    times = []
    for _ in range(options.execs):
        start = time.perf_counter()
        ran = await api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": ["true"]})
        times.append((time.perf_counter() - start) * 1000)
        ran.raise_for_status()
    result["exec_round_trip_api"] = summary(times)

    pauses, resumes = [], []
    for _ in range(20):
        start = time.perf_counter()
        (await api.post(f"/v1/sandboxes/{sandbox_id}/pause")).raise_for_status()
        await until(api, sandbox_id, "paused")
        pauses.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        (await api.post(f"/v1/sandboxes/{sandbox_id}/resume")).raise_for_status()
        await until(api, sandbox_id, "running")
        resumes.append((time.perf_counter() - start) * 1000)
    result["pause_api"], result["resume_api"] = summary(pauses), summary(resumes)
    result.update(await files_and_ports(api, sandbox_id))
    await api.delete(f"/v1/sandboxes/{sandbox_id}")

    if options.density:
        result["density"] = await density(api, options.density, iso)
    return result


def mem_available_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise SystemExit("no MemAvailable in /proc/meminfo")


def busy_ticks() -> int:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


async def density(api: httpx.AsyncClient, count: int, iso: str | None) -> dict[str, Any]:
    before = mem_available_kib()
    made = []
    for start in range(0, count, 25):
        made += await asyncio.gather(
            *(create_and_first_exec(api, iso) for _ in range(min(25, count - start)))
        )
    await asyncio.sleep(2)  # let the start-up's page cache and slabs settle before reading
    after = mem_available_kib()
    ticks = busy_ticks()
    await asyncio.sleep(10)
    idle_cpu = (busy_ticks() - ticks) / os.sysconf("SC_CLK_TCK") / 10
    for sandbox_id, _ in made:
        await api.delete(f"/v1/sandboxes/{sandbox_id}")
    return {
        "sandboxes": count,
        "host_mib_each": round((before - after) / 1024 / count, 2),
        "idle_cpu_cores": round(idle_cpu, 3),
    }


async def alone(isolation: str) -> dict[str, Any]:
    """The node's own layer in this process: exec round trip, freeze and thaw."""
    with tempfile.TemporaryDirectory(prefix="treadle-bench-sbx-") as scratch:
        settings = ShuttleSettings(
            weaver_url="http://127.0.0.1:9", home=Path(scratch), allow_process_runtime=True
        )
        runtime = available_runtimes(settings).get(Tier(isolation))
        if not isinstance(runtime, ProcessRuntime):
            return {"error": f"no {isolation} tier here"}
        spec = SandboxSpec(
            id="sbx_bench",
            incarnation=1,
            tenant_id="tn_bench",
            resources=Resources(**SMALL),
            isolation=Tier(isolation),
            env={},
            python="/usr/bin/python3",
        )
        start = time.perf_counter()
        sandbox = await LiveSandbox.start(runtime.launcher, spec, Path(scratch) / "work")
        started_ms = (time.perf_counter() - start) * 1000
        try:
            times = []
            for _ in range(200):
                start = time.perf_counter()
                process = await sandbox.link.exec(["true"])
                async for _chunk in process.output():
                    pass
                await process.wait()
                times.append((time.perf_counter() - start) * 1000)
            pauses, resumes = [], []
            for _ in range(20):
                start = time.perf_counter()
                await sandbox.pause()
                pauses.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await sandbox.resume()
                resumes.append((time.perf_counter() - start) * 1000)
        finally:
            await sandbox.stop(grace_s=0)
    return {
        "start_ms": round(started_ms, 1),
        "exec_round_trip": summary(times),
        "pause": summary(pauses),
        "resume": summary(resumes),
    }


async def files_and_ports(api: httpx.AsyncClient, sandbox_id: str, n: int = 50) -> dict[str, Any]:
    result: dict[str, Any] = {}
    content = f"/v1/sandboxes/{sandbox_id}/files/content"
    data = os.urandom(1024 * 1024)
    writes, reads = [], []
    for _ in range(n):
        start = time.perf_counter()
        (await api.put(content, params={"path": "one.bin"}, content=data)).raise_for_status()
        writes.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        read = await api.get(content, params={"path": "one.bin"})
        reads.append((time.perf_counter() - start) * 1000)
        assert read.content == data
    result["file_1mib_write"], result["file_1mib_read"] = summary(writes), summary(reads)

    big = os.urandom(32 * 1024 * 1024)  # within the sandbox's 64 MiB of memory (its disk is tmpfs)

    async def chunks() -> Any:
        for start in range(0, len(big), 1024 * 1024):
            yield big[start : start + 1024 * 1024]

    start = time.perf_counter()
    (await api.put(content, params={"path": "big.bin"}, content=chunks())).raise_for_status()
    result["upload_32mib_mb_s"] = round(len(big) / 1e6 / (time.perf_counter() - start), 1)

    (
        await api.put(content, params={"path": "www/small.txt"}, content=b"x" * 100)
    ).raise_for_status()
    server = "cd www && exec python3 -m http.server 8000 --bind 127.0.0.1"
    ready = "until curl -so /dev/null 127.0.0.1:8000; do sleep 0.05; done"
    await api.post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": f"({server}) >/dev/null 2>&1 &"}
    )
    (await api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": ready})).raise_for_status()
    through = f"/v1/sandboxes/{sandbox_id}/ports/8000/small.txt"
    result["port_get_api"] = summary(await _gets(api, through, n * 4))

    with tempfile.TemporaryDirectory() as root:
        await asyncio.to_thread(Path(root, "small.txt").write_bytes, b"x" * 100)
        host = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "-d",
            root,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert host.stdout is not None
        line = (await host.stdout.readline()).decode()  # "Serving HTTP on … port N …"
        port = int(line.split(" port ")[1].split()[0])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as direct:
            result["port_get_direct"] = summary(await _gets(direct, "/small.txt", n * 4))
        host.terminate()
        await host.wait()
    result["port_get_ratio"] = round(
        result["port_get_api"]["p50_ms"] / result["port_get_direct"]["p50_ms"], 1
    )

    ws_url = str(api.base_url).replace("http", "ws", 1) + f"/v1/sandboxes/{sandbox_id}"
    from websockets.asyncio.client import connect

    headers = {"Authorization": api.headers["Authorization"]}
    async with connect(f"{ws_url}/exec", additional_headers=headers) as ws:
        await ws.send(json.dumps({"cmd": ["sleep", "600"], "tag": "held"}))
        await ws.recv()
    attaches = []
    for _ in range(n):
        start = time.perf_counter()
        async with connect(f"{ws_url}/processes/held", additional_headers=headers) as ws:
            await ws.recv()
            attaches.append((time.perf_counter() - start) * 1000)
    result["attach_api"] = summary(attaches)
    return result


async def _gets(client: httpx.AsyncClient, path: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        got = await client.get(path, headers={"connection": "close"})
        times.append((time.perf_counter() - start) * 1000)
        got.raise_for_status()
    return times


def raw_true(n: int = 200) -> dict[str, float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        null = os.open(os.devnull, os.O_RDWR)
        pid = spawn("/bin/true", ["/bin/true"], {}, Path("/"), {0: null, 1: null, 2: null})
        os.close(null)
        os.waitpid(pid, 0)
        times.append((time.perf_counter() - start) * 1000)
    return summary(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("-n", type=int, default=30)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--density", type=int, default=0, help="idle sandboxes to hold (0: skip)")
    parser.add_argument("--isolation", default="namespace")
    options = parser.parse_args()
    result: dict[str, Any] = {"host": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    result["alone"] = await alone(options.isolation)
    result["raw_true"] = raw_true()
    config = load_config(options.url)
    headers = {"Authorization": f"Bearer {config.require_api_key()}"}
    limits = httpx.Limits(max_connections=options.burst + 8)
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, timeout=120, limits=limits
    ) as api:
        result["api"] = await through_api(api, options)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    asyncio.run(main())
