"""Dispatch latency and throughput against a running treadle (e.g. `treadle up`).

    .venv/bin/python bench/dispatch.py [--url URL | --store sqlite|postgresql]
                                       [--sequential 1000] [--concurrency 32]
                                       [--total 3000] [--isolation TIER]

With `--store`, it starts its own Weaver on that store (PostgreSQL: a private server, as the
tests start one) and one Shuttle offering the process tier, instead of using `--url`.

Measures, for a function running `/bin/echo 13`:
  * sequential: N invocations one after another with `?wait`, client-side round trip
    (invoke → success, HTTP included) and server-side open→running / open→success from the
    execution's own timestamps;
  * sustained throughput: C connections each invoking with `?wait` in a closed loop. The
    load comes from `wrk` (Debian package `wrk`) when it is installed, since a Python HTTP
    client needs more CPU per request than the server it measures; otherwise from httpx
    until `total` executions have completed. Afterwards the executions' final states are
    counted through the API, so a lost or failed execution shows.

Prints p50/p99 and executions/s; writes the raw figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from servers import cpu_seconds, database_cpu_seconds, local_stack, wrk
from treadle.client.config import ClientConfig, load_config


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
    transport_errors: list[str] = []
    latencies: list[float] = []

    async def invoke_once() -> dict[str, Any]:
        # An idempotency key makes a retry after a dropped connection safe: it returns the
        # execution the first try created instead of creating another.
        body = {"idempotency_key": uuid.uuid4().hex}
        for attempt in range(3):
            try:
                response = await api.post(f"/v1/functions/{function}/invoke?wait=60", json=body)
                return dict(response.json())
            except httpx.TransportError as exc:
                transport_errors.append(f"{time.monotonic():.3f} {type(exc).__name__} {exc}")
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            execution = await invoke_once()
            latencies.append((time.perf_counter() - start) * 1000)
            if execution.get("state") != "success":
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "executions": total,
        "failures": failures,
        "transport_errors": transport_errors,
        "seconds": round(elapsed, 3),
        "executions_per_s": round(total / elapsed, 1),
        "latency": summary(latencies),
    }


async def count_states(api: httpx.AsyncClient, function: str) -> dict[str, int]:
    states: dict[str, int] = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"function": function, "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/v1/executions", params=params)).json()
        for item in page["items"]:
            states[item["state"]] = states.get(item["state"], 0) + 1
        cursor = page["next_cursor"]
        if cursor is None:
            return states


async def round_trip_wrk(url: str, headers: dict[str, str], function: str) -> dict[str, Any]:
    """One connection, one invocation at a time: invoke → success as a lean client sees it."""
    result = await wrk(url, headers, function, connections=1, seconds=10)
    return {"load": "wrk -c1", **result}


async def throughput_wrk(
    api: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    function: str,
    concurrency: int,
    seconds: int,
) -> dict[str, Any]:
    before = await count_states(api, function)
    result = await wrk(url, headers, function, concurrency, seconds)
    # wrk stops with requests in flight: let them end before counting what happened.
    deadline = time.monotonic() + 60
    while True:
        after = await count_states(api, function)
        if not (after.get("open") or after.get("running")) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    made = {state: after.get(state, 0) - before.get(state, 0) for state in after}
    return {
        "load": "wrk",
        "concurrency": concurrency,
        "seconds": seconds,
        "executions_per_s": round(made.get("success", 0) / seconds, 1),
        "final_states": made,
        **result,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        help="start a Weaver on this store and a Shuttle for this run, instead of --url",
    )
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--total", type=int, default=3000, help="executions (httpx load)")
    parser.add_argument("--seconds", type=int, default=15, help="duration (wrk load)")
    parser.add_argument("--load", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--command", default="/bin/echo 13")
    parser.add_argument("--cpu", type=int, default=10, help="millicores each execution asks for")
    parser.add_argument(
        "--isolation",
        choices=["process", "namespace", "oci", "gvisor"],
        help="the tier to run in (default: the one Weaver picks)",
    )
    args = parser.parse_args()
    if args.store is None:
        await measure(args, load_config(args.url))
        return
    with local_stack(args.store) as stack:
        pids = {"weaver": stack.weaver.proc.pid}
        if stack.shuttle is not None:
            pids["shuttle"] = stack.shuttle.pid
        await measure(args, load_config(stack.weaver.url, stack.weaver.key), pids)


async def measure(
    args: argparse.Namespace, config: ClientConfig, pids: dict[str, int] | None = None
) -> None:
    """The runs, against `config`'s Weaver; with `pids`, the CPU those processes spent per
    execution of the sustained run too."""
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk") is not None)
    headers = {"Authorization": f"Bearer {config.require_api_key()}"}
    limits = httpx.Limits(max_connections=args.concurrency + 4, keepalive_expiry=15)
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, timeout=120, limits=limits
    ) as api:
        function = f"bench-echo-{args.isolation or 'default'}"
        body: dict[str, Any] = {
            "name": function,
            "command": args.command.split(),
            "timeout_s": 30,
            "max_attempts": 1,
            # what `echo` needs; the default (1 CPU) would allow two at a time per 2 cores
            "resources": {"cpu_millicores": args.cpu, "memory_mib": 16},
        }
        if args.isolation:
            body["isolation"] = args.isolation
        created = await api.post("/v1/functions", json=body)
        created.raise_for_status()
        if args.warmup:
            await sequential(api, function, args.warmup)
        results = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "url": config.url,
            "store": args.store,
            "command": args.command,
            "isolation": args.isolation,
            "cpus": os.cpu_count(),
            "sequential": await sequential(api, function, args.sequential),
            "round_trip": (
                await round_trip_wrk(config.url, headers, function) if use_wrk else None
            ),
        }
        before = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
        database_before = database_cpu_seconds()
        results["throughput"] = await (
            throughput_wrk(api, config.url, headers, function, args.concurrency, args.seconds)
            if use_wrk
            else throughput(api, function, args.concurrency, args.total)
        )
        made = results["throughput"].get("final_states", {}).get("success") or args.total
        results["cpu_ms_per_execution"] = {
            name: round((cpu_seconds(pid) - before[name]) * 1000 / max(made, 1), 3)
            for name, pid in (pids or {}).items()
        }
        if args.store == "postgresql":
            spent = database_cpu_seconds() - database_before
            results["cpu_ms_per_execution"]["database"] = round(spent * 1000 / max(made, 1), 3)
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"dispatch-{int(time.time())}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
