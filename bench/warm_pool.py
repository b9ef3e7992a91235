"""The microvm tier through the API, cold and from the warm pool, in one run.

    .venv/bin/python bench/warm_pool.py [-n 10]

Starts `treadle up` twice on this machine (its own home and port each time, the microvm
tier offered by its local Shuttle): first with no warm pool, then with `--microvm-warm 1`.
Against each, one after another:

  * `echo_13`: a function (`sh -c 'echo 13'`, 1 vCPU, 256 MiB, isolation `microvm`) invoked
    with `?wait`: the client's round trip, and Weaver's own open -> success;
  * `create_to_first_exec`: a sandbox (1 vCPU, 256 MiB, isolation `microvm`) created, then
    `true` exec'd in it (which waits for it to run): what an agent waits for first.

With the pool, each start waits first until the pool holds a VM of its shape (read from the
Shuttle's metrics; the refill is not timed), so every timed start is a hit; the hits and
misses the node counted are reported. One run discarded first, for each figure.

Prints JSON: p50/p99 in ms, and warm over cold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

SHAPE = {"cpu_millicores": 1000, "memory_mib": 256}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(ordered[len(ordered) // 2], 1),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


@contextlib.contextmanager
def treadle_up(warm: int) -> Iterator[tuple[httpx.Client, str]]:
    """A `treadle up` of its own, its API client (admin), and its Shuttle's metrics URL."""
    home, port, metrics = (
        Path(tempfile.mkdtemp(prefix="treadle-bench-pool-")),
        free_port(),
        free_port(),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
    env.update(TREADLE_HOME=str(home), TREADLE_SHUTTLE_METRICS_ADDR=f"127.0.0.1:{metrics}")
    argv = [sys.executable, "-m", "treadle", "up", "--port", str(port)]
    if warm:
        argv += ["--microvm-warm", str(warm)]
    with (home / "up.log").open("w") as log:
        up = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Press Ctrl-C" not in (home / "up.log").read_text():
            if time.monotonic() > deadline or up.poll() is not None:
                raise SystemExit((home / "up.log").read_text())
            time.sleep(0.1)
        key = (home / "admin.key").read_text().strip()
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        ) as api:
            while not any("microvm" in n["runtimes"] for n in api.get("/v1/nodes").json()["items"]):
                if time.monotonic() > deadline:
                    raise SystemExit("the local node does not offer the microvm tier")
                time.sleep(0.1)
            yield api, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)


def pool(metrics: str) -> dict[str, float]:
    text = httpx.get(metrics, timeout=30).text
    return {
        sample.name.removeprefix("treadle_shuttle_warm_pool_") + "".join(sample.labels.values()): (
            sample.value
        )
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("treadle_shuttle_warm_pool")
    }


def until_filled(metrics: str) -> None:
    # Each GET is a round trip: polling needs no sleep of its own, but the VM's boot takes
    # seconds under emulation; a short pause keeps the poll from taking a core.
    deadline = time.monotonic() + 120
    while True:
        now = pool(metrics)
        if now.get("vmsready", 0) >= 1 and not now.get("vmsbooting", 0):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the pool did not fill: {now}")
        time.sleep(0.05)


def measure(api: httpx.Client, metrics: str, n: int, warm: bool) -> dict[str, Any]:
    name = "bench-pool-echo"
    api.post(
        "/v1/functions",
        json={
            "name": name,
            "command": ["sh", "-c", "echo 13"],
            "isolation": "microvm",
            "max_attempts": 1,
            "resources": SHAPE,
        },
    ).raise_for_status()
    client, server, sandboxes = [], [], []
    for i in range(n + 1):
        if warm and i:
            until_filled(metrics)
        start = time.perf_counter()
        execution = api.post(f"/v1/functions/{name}/invoke?wait=60", json={}).json()
        elapsed = (time.perf_counter() - start) * 1000
        if execution.get("state") != "success":
            raise SystemExit(f"echo 13: {execution}")
        if i:
            client.append(elapsed)
            stamps = {
                key: datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                for key, value in execution["timestamps"].items()
            }
            server.append((stamps["success"] - stamps["open"]) * 1000)
    for i in range(n + 1):
        if warm and i:
            until_filled(metrics)
        start = time.perf_counter()
        created = api.post(
            "/v1/sandboxes",
            json={"resources": SHAPE, "isolation": "microvm", "timeout_s": 600},
        )
        created.raise_for_status()
        sandbox = created.json()["id"]
        ran = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": ["true"]})
        ran.raise_for_status()
        elapsed = (time.perf_counter() - start) * 1000
        if ran.json()["exit_code"] != 0:
            raise SystemExit(f"exec in {sandbox}: {ran.text}")
        api.delete(f"/v1/sandboxes/{sandbox}")
        if i:
            sandboxes.append(elapsed)
    counted = pool(metrics)
    return {
        "echo_13_ms": summary(client),
        "echo_13_server_ms": summary(server),
        "create_to_first_exec_ms": summary(sandboxes),
        "pool_hits": counted.get("takes_totalhit", 0),
        "pool_misses": counted.get("takes_totalmiss", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    report: dict[str, Any] = {"runs": args.n, "shape": SHAPE}
    for label, warm in (("cold", 0), ("warm", 1)):
        with treadle_up(warm) as (api, metrics):
            report[label] = measure(api, metrics, args.n, bool(warm))
    for figure in ("echo_13_ms", "create_to_first_exec_ms"):
        ratio = report["warm"][figure]["p50"] / report["cold"][figure]["p50"]
        report[f"{figure.removesuffix('_ms')}_warm_over_cold_p50"] = round(ratio, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
