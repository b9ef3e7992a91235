"""Weaver alone: executions/s through the real API and store, with simulated nodes whose
runtime does nothing (`treadle.shuttle.simulate`), and what 1,000 nodes' heartbeats cost.

    .venv/bin/python bench/control_plane.py [--store sqlite|postgresql] [--replicas 1]
        [--nodes 10] [--seconds 10] [--concurrency 32] [--batch-size 1000] [--batches 4]
        [--fleet 1000] [--fleet-seconds 20] [--database-cpu N]

Starts its own Weaver (and, for `postgresql`, a private PostgreSQL server; with `--replicas`,
that many Weavers on it and a private NATS server, each holding its share of the nodes and
taking its share of the load), then:
  * sequential: one `?wait` invoke after another, client round trip;
  * single: `--concurrency` clients each invoking with `?wait` in a closed loop;
  * batch: `--batches` SDK `map` calls at a time, `--batch-size` inputs each, results
    gathered over the results WebSocket as the SDK does;
  * fleet: `--fleet` simulated nodes with 1 s heartbeats, Weaver's CPU while they idle, then
    a batch placed across them.
Weaver's CPU per execution (all replicas' together) comes from /proc. With
`--database-cpu N`, CPU N runs PostgreSQL alone and everything else runs on the others (on
SQLite too, so that both give Weaver the same CPUs). Prints JSON; writes it under
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from servers import (
    PY,
    WeaverProcess,
    cpu_seconds,
    database_cpu_seconds,
    database_for,
    nats_for,
    own_cpu,
    summary,
    until,
    wrk,
)
from treadle.client import AsyncClient

FUNCTION = "noop"


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


def weaver_cpu(weavers: list[WeaverProcess]) -> float:
    return sum(cpu_seconds(weaver.proc.pid) for weaver in weavers)


def measured(
    weavers: list[WeaverProcess], done: int, started: float, cpu_before: float
) -> dict[str, Any]:
    elapsed = time.perf_counter() - started
    cpu = weaver_cpu(weavers) - cpu_before
    database = database_cpu_seconds() - _database_before
    return {
        "executions": done,
        "seconds": round(elapsed, 2),
        "executions_per_s": round(done / elapsed, 1),
        "weaver_cpu_ms_per_execution": round(cpu * 1000 / max(done, 1), 3),
        "weaver_cores": round(cpu / elapsed, 2),
        "database_cpu_ms_per_execution": round(database * 1000 / max(done, 1), 3),
    }


_database_before = 0.0


def weaver_cpu_now(weavers: list[WeaverProcess]) -> float:
    """Weaver's CPU so far; and the database server's, kept for `measured`."""
    global _database_before
    _database_before = database_cpu_seconds()
    return weaver_cpu(weavers)


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
    weavers: list[WeaverProcess], api: httpx.AsyncClient, concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` clients, spread over the replicas, each invoking with `?wait`."""
    share = max(1, concurrency // len(weavers))
    if shutil.which("wrk"):
        # A lean client: a Python one needs more CPU per request than Weaver does.
        cpu, started = weaver_cpu_now(weavers), time.perf_counter()
        before = await _succeeded(api)
        loaded = await asyncio.gather(
            *(wrk(w.url, w.headers, FUNCTION, share, int(seconds)) for w in weavers)
        )
        done = await _succeeded(api) - before
        return {
            "load": "wrk",
            "concurrency": share * len(weavers),
            "wrk": loaded,
            **measured(weavers, done, started, cpu),
        }
    deadline = time.monotonic() + seconds
    done = failed = 0

    async def client(url: str) -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            body = {"idempotency_key": uuid.uuid4().hex}
            answer = await api.post(f"{url}/v1/functions/{FUNCTION}/invoke?wait=60", json=body)
            if answer.json().get("state") == "success":
                done += 1
            else:
                failed += 1

    cpu, started = weaver_cpu_now(weavers), time.perf_counter()
    await asyncio.gather(*(client(w.url) for w in weavers for _ in range(share)))
    return {
        "load": "httpx",
        "concurrency": share * len(weavers),
        "failed": failed,
        **measured(weavers, done, started, cpu),
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


async def batch(
    weavers: list[WeaverProcess], size: int, in_flight: int, seconds: float
) -> dict[str, Any]:
    """`in_flight` SDK `map` calls at a time, spread over the replicas."""
    deadline = time.monotonic() + seconds
    done = failed = batches = 0

    async def mapper(weaver: WeaverProcess) -> None:
        nonlocal done, failed, batches
        async with AsyncClient(weaver.url, weaver.key) as client:
            while time.monotonic() < deadline:
                inputs = [{"i": i} for i in range(size)]
                async for execution in client.map(FUNCTION, inputs, batch_size=size):
                    if execution["state"] == "success":
                        done += 1
                    else:
                        failed += 1
                batches += 1

    cpu, started = weaver_cpu_now(weavers), time.perf_counter()
    await asyncio.gather(*(mapper(weavers[n % len(weavers)]) for n in range(in_flight)))
    return {
        "batch_size": size,
        "in_flight": in_flight,
        "batches": batches,
        "failed": failed,
        **measured(weavers, done, started, cpu),
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
    if args.replicas > 1 and args.store != "postgresql":
        raise SystemExit("replicas share a PostgreSQL database: --store postgresql")
    own_cpu(args.database_cpu)
    with (
        database_for(args.store, args.database_cpu) as url,
        tempfile.TemporaryDirectory() as tmp,
        nats_for(args.replicas) as nats,
    ):
        home = Path(tmp) / "weaver"
        weavers: list[WeaverProcess] = []
        fleets: list[Fleet] = []
        try:
            for _ in range(args.replicas):
                weavers.append(WeaverProcess(home, url, node_down_after_s="10", **nats))
            for n, weaver in enumerate(weavers):
                fleets.append(Fleet(weaver, max(1, args.nodes // len(weavers)), f"sim{n}"))
            results: dict[str, Any] = {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "store": args.store,
                "replicas": args.replicas,
                "cpus": os.cpu_count(),
                "database_cpu": args.database_cpu,
                "nodes": args.nodes,
            }
            limits = httpx.Limits(max_connections=args.concurrency + 4, keepalive_expiry=15)
            first = weavers[0]
            async with httpx.AsyncClient(
                base_url=first.url, headers=first.headers, timeout=120, limits=limits
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
                results["single"] = await single(weavers, api, args.concurrency, args.seconds)
            results["batch"] = await batch(weavers, args.batch_size, args.batches, args.seconds)
            for fleet in fleets:
                fleet.stop()
            fleets = []
            if args.fleet and args.replicas == 1:
                results["fleet"] = await fleet_cost(first, args.fleet, args.fleet_seconds)
            return results
        finally:
            for fleet in fleets:
                fleet.stop()
            for weaver in weavers:
                weaver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--replicas", type=int, default=1, help="Weavers (PostgreSQL + NATS)")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=4, help="batches in flight at once")
    parser.add_argument("--fleet", type=int, default=1000, help="0 to skip")
    parser.add_argument("--fleet-seconds", type=float, default=20)
    parser.add_argument(
        "--database-cpu", type=int, help="a CPU for PostgreSQL alone; the rest run the others"
    )
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = f"control-plane-{args.store}-x{args.replicas}-{int(time.time())}.json"
    (out / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
