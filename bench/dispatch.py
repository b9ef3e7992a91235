"""Dispatch latency and throughput against a running treadle (e.g. `treadle up`).

    .venv/bin/python bench/dispatch.py [--url URL] [--sequential 1000] [--concurrency 32]
                                       [--total 3000]

Measures, for a function running `/bin/echo 13`:
  * sequential: N invocations one after another with `?wait`, client-side round trip
    (invoke → success, HTTP included) and server-side open→running / open→success from the
    execution's own timestamps;
  * sustained throughput: C clients each invoking with `?wait` in a closed loop until
    `total` executions have completed.

Prints p50/p99 and executions/s; writes the raw figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from treadle.client.config import load_config


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "mean_ms": round(statistics.fmean(values), 2),
        "n": len(values),
    }


def _server_ms(execution: dict[str, Any]) -> tuple[float, float]:
    stamps = execution["timestamps"]

    def ts(key: str) -> float:
        return datetime.fromisoformat(stamps[key].replace("Z", "+00:00")).timestamp()

    return (ts("running") - ts("open")) * 1000, (ts("success") - ts("open")) * 1000


async def sequential(api: httpx.AsyncClient, function: str, n: int) -> dict[str, Any]:
    round_trip, to_running, to_success = [], [], []
    for _ in range(n):
        start = time.perf_counter()
        response = await api.post(f"/v1/functions/{function}/invoke?wait=30", json={})
        round_trip.append((time.perf_counter() - start) * 1000)
        execution = response.json()
        if execution["state"] != "success":
            raise SystemExit(f"execution did not succeed: {execution}")
        running, success = _server_ms(execution)
        to_running.append(running)
        to_success.append(success)
    return {
        "invoke_to_success_client": summary(round_trip),
        "open_to_running_server": summary(to_running),
        "open_to_success_server": summary(to_success),
    }


async def throughput(
    api: httpx.AsyncClient, function: str, concurrency: int, total: int
) -> dict[str, Any]:
    remaining = total
    failures = 0
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            response = await api.post(f"/v1/functions/{function}/invoke?wait=60", json={})
            latencies.append((time.perf_counter() - start) * 1000)
            if response.json().get("state") != "success":
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "executions": total,
        "failures": failures,
        "seconds": round(elapsed, 3),
        "executions_per_s": round(total / elapsed, 1),
        "latency": summary(latencies),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--total", type=int, default=3000)
    parser.add_argument("--command", default="/bin/echo 13")
    parser.add_argument("--cpu", type=int, default=10, help="millicores each execution asks for")
    args = parser.parse_args()

    config = load_config(args.url)
    headers = {"Authorization": f"Bearer {config.require_api_key()}"}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, timeout=120, limits=limits
    ) as api:
        function = "bench-echo"
        created = await api.post(
            "/v1/functions",
            json={
                "name": function,
                "command": args.command.split(),
                "timeout_s": 30,
                "max_attempts": 1,
                # what `echo` needs; the default (1 CPU) would allow two at a time per 2 cores
                "resources": {"cpu_millicores": args.cpu, "memory_mib": 16},
            },
        )
        created.raise_for_status()
        if args.warmup:
            await sequential(api, function, args.warmup)
        results = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "url": config.url,
            "command": args.command,
            "cpus": os.cpu_count(),
            "sequential": await sequential(api, function, args.sequential),
            "throughput": await throughput(api, function, args.concurrency, args.total),
        }
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"dispatch-{int(time.time())}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
