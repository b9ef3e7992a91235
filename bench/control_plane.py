"""Weaver alone: executions/s through the real API and store, with simulated nodes whose
runtime does nothing (`treadle.shuttle.simulate`), and what 1,000 nodes' heartbeats cost.

    .venv/bin/python bench/control_plane.py [--store sqlite|postgresql] [--nodes 10]
        [--seconds 10] [--concurrency 32] [--batch-size 1000] [--batches 4]
        [--fleet 1000] [--fleet-seconds 20]

Starts its own Weaver (and, for `postgresql`, a private PostgreSQL server), then:
  * sequential: one `?wait` invoke after another, client round trip;
  * single: `--concurrency` clients each invoking with `?wait` in a closed loop;
  * batch: `--batches` SDK `map` calls at a time, `--batch-size` inputs each, results
    gathered over the results WebSocket as the SDK does;
  * fleet: `--fleet` simulated nodes with 1 s heartbeats, Weaver's CPU while they idle, then
    a batch placed across them.
Weaver's CPU per execution comes from /proc. Prints JSON; writes it under bench/results/.
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
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from servers import PY, WeaverProcess, cpu_seconds, database_for, until, wrk
from treadle.client import AsyncClient

FUNCTION = "noop"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 2)

    return {"p50_ms": at(50), "p99_ms": at(99), "mean_ms": round(statistics.fmean(values), 2)}


class Fleet:
    """Simulated nodes in a process of their own, so their CPU is not the load's."""

    def __init__(self, weaver: WeaverProcess, count: int, prefix: str) -> None:
        env = dict(os.environ, TREADLE_SHUTTLE_TOKEN=weaver.token)
        argv = [PY, "-m", "treadle.shuttle.simulate", "--weaver", weaver.url]
        argv += ["--nodes", str(count), "--prefix", prefix]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "joined" not in line:
            raise SystemExit(f"the simulated fleet did not join: {line!r}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def measured(weaver: WeaverProcess, done: int, started: float, cpu_before: float) -> dict[str, Any]:
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(weaver.proc.pid) - cpu_before
    return {
        "executions": done,
        "seconds": round(elapsed, 2),
        "executions_per_s": round(done / elapsed, 1),
        "weaver_cpu_ms_per_execution": round(cpu * 1000 / max(done, 1), 3),
        "weaver_cores": round(cpu / elapsed, 2),
    }


async def sequential(api: httpx.AsyncClient, n: int) -> dict[str, Any]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        answer = await api.post(f"/v1/functions/{FUNCTION}/invoke?wait=30", json={})
        times.append((time.perf_counter() - start) * 1000)
        if answer.json().get("state") != "success":
            raise SystemExit(f"an execution did not succeed: {answer.text}")
    return {"n": n, "round_trip": summary(times)}


async def single(
    weaver: WeaverProcess, api: httpx.AsyncClient, concurrency: int, seconds: float
) -> dict[str, Any]:
    if shutil.which("wrk"):
        # A lean client: a Python one needs more CPU per request than Weaver does.
        cpu, started = cpu_seconds(weaver.proc.pid), time.perf_counter()
        before = await _succeeded(api)
        loaded = await wrk(weaver.url, weaver.headers, FUNCTION, concurrency, int(seconds))
        done = await _succeeded(api) - before
        return {"load": "wrk", "concurrency": concurrency, "wrk": loaded} | measured(
            weaver, done, started, cpu
        )
    deadline = time.monotonic() + seconds
    done = failed = 0

    async def client() -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            body = {"idempotency_key": uuid.uuid4().hex}
            answer = await api.post(f"/v1/functions/{FUNCTION}/invoke?wait=60", json=body)
            if answer.json().get("state") == "success":
                done += 1
            else:
                failed += 1

    cpu, started = cpu_seconds(weaver.proc.pid), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {
        "load": "httpx",
        "concurrency": concurrency,
        "failed": failed,
        **measured(weaver, done, started, cpu),
    }


async def _succeeded(api: httpx.AsyncClient) -> int:
    """Executions of FUNCTION that succeeded so far (the usage API would do; a page count
    is enough for a benchmark that made all of them)."""
    total, cursor = 0, None
    while True:
        params: dict[str, Any] = {"function": FUNCTION, "state": "success", "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/v1/executions", params=params)).json()
        total += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return total


async def batch(weaver: WeaverProcess, size: int, in_flight: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    done = failed = batches = 0

    async def mapper(client: AsyncClient) -> None:
        nonlocal done, failed, batches
        while time.monotonic() < deadline:
            inputs = [{"i": i} for i in range(size)]
            async for execution in client.map(FUNCTION, inputs, batch_size=size):
                if execution["state"] == "success":
                    done += 1
                else:
                    failed += 1
            batches += 1

    cpu, started = cpu_seconds(weaver.proc.pid), time.perf_counter()
    async with AsyncClient(weaver.url, weaver.key) as client:
        await asyncio.gather(*(mapper(client) for _ in range(in_flight)))
    return {
        "batch_size": size,
        "in_flight": in_flight,
        "batches": batches,
        "failed": failed,
        **measured(weaver, done, started, cpu),
    }


async def fleet_cost(weaver: WeaverProcess, count: int, seconds: float) -> dict[str, Any]:
    started = time.perf_counter()
    fleet = Fleet(weaver, count, "many")
    try:
        until(lambda: weaver.connected_nodes() >= count, 120, f"{count} nodes to connect")
        joined_s = time.perf_counter() - started
        cpu = cpu_seconds(weaver.proc.pid)
        fleet_cpu = cpu_seconds(fleet.proc.pid)
        await asyncio.sleep(seconds)
        idle = {
            "nodes": count,
            "join_s": round(joined_s, 1),
            "weaver_cores_idle": round((cpu_seconds(weaver.proc.pid) - cpu) / seconds, 3),
            "fleet_process_cores": round((cpu_seconds(fleet.proc.pid) - fleet_cpu) / seconds, 3),
            "connected_after": weaver.connected_nodes(),
        }
        # Placement across them all still answers: every execution succeeds, spread wide.
        async with AsyncClient(weaver.url, weaver.key) as client:
            inputs = [{"i": i} for i in range(2 * count)]
            ran = [e async for e in client.map(FUNCTION, inputs, batch_size=1000)]
        idle["placed_executions"] = len(ran)
        idle["placed_all_succeeded"] = all(e["state"] == "success" for e in ran)
        idle["distinct_nodes_used"] = len({e["node_id"] for e in ran})
        return idle
    finally:
        fleet.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with database_for(args.store) as url, tempfile.TemporaryDirectory() as tmp:
        weaver = WeaverProcess(Path(tmp) / "weaver", url, node_down_after_s="10")
        try:
            fleet = Fleet(weaver, args.nodes, "sim")
            results: dict[str, Any] = {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "store": args.store,
                "cpus": os.cpu_count(),
                "nodes": args.nodes,
            }
            limits = httpx.Limits(max_connections=args.concurrency + 4, keepalive_expiry=15)
            async with httpx.AsyncClient(
                base_url=weaver.url, headers=weaver.headers, timeout=120, limits=limits
            ) as api:
                function = {
                    "name": FUNCTION,
                    "command": ["true"],
                    "max_attempts": 1,
                    "resources": {"cpu_millicores": 10, "memory_mib": 16},
                }
                (await api.post("/v1/functions", json=function)).raise_for_status()
                await sequential(api, 50)  # warm-up
                results["sequential"] = await sequential(api, args.sequential)
                results["single"] = await single(weaver, api, args.concurrency, args.seconds)
            results["batch"] = await batch(weaver, args.batch_size, args.batches, args.seconds)
            fleet.stop()
            if args.fleet:
                results["fleet"] = await fleet_cost(weaver, args.fleet, args.fleet_seconds)
            return results
        finally:
            weaver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=4, help="batches in flight at once")
    parser.add_argument("--fleet", type=int, default=1000, help="0 to skip")
    parser.add_argument("--fleet-seconds", type=float, default=20)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"control-plane-{args.store}-{int(time.time())}.json").write_text(
        json.dumps(results, indent=2)
    )


if __name__ == "__main__":
    main()
