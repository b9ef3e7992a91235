"""What metering costs: the ledger's write rate, a node's CPU with many idle sandboxes
metered every 5 s next to the same node not metering, and dispatch throughput with and
without metering, in one run.

    .venv/bin/python bench/metering.py [--sandboxes 200] [--seconds 30] [--records 20000]
        [--dispatch-seconds 15] [--clients 4]

It starts its own Weaver (SQLite, or `--database-url`) and Shuttles on loopback, in a
temporary home:

  * `ledger`: a node played by this program holds 50 executions and sends `--records` usage
    records for them in frames of 500, as a node replaying its journal would; records stored
    and acknowledged per second, from the first frame to the last acknowledgement;
  * `idle_node`: a Shuttle (namespace tier) holding `--sandboxes` idle sandboxes; the CPU time
    the Shuttle process used over `--seconds`, with `--usage-interval 5` and with
    `--no-metering`;
  * `dispatch`: `--clients` clients each invoking a no-op function (`true`, process tier)
    with `?wait` back to back for `--dispatch-seconds`, on a Shuttle that meters and on one
    that does not (`--no-metering`), twice each, alternating; executions per second and
    latency through the API.

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from servers import free_port, until
from treadle.domain.resources import Resources, Tier
from treadle.protocol import (
    PROTOCOL_VERSION,
    Assign,
    Hello,
    Started,
    UsageAck,
    UsageRecord,
    UsageReport,
    Welcome,
    decode_from_weaver,
    encode,
)

PY = sys.executable


class Weaver:
    def __init__(self, home: Path, database_url: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(
            os.environ, TREADLE_NODE_DOWN_AFTER_S="300", TREADLE_MAX_SANDBOXES_PER_TENANT="10000"
        )
        if database_url:
            env["TREADLE_DATABASE_URL"] = database_url
        self.home = home
        argv = [PY, "-m", "treadle", "weaver", "--home", str(home), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        until(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, 60)
        self.key = (home / "admin.key").read_text().strip()
        self.token = (home / "join.token").read_text().strip()
        self.api = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120
        )

    def stop(self) -> None:
        self.api.close()
        self.proc.terminate()
        self.proc.wait(30)


def ledger_rate(weaver: Weaver, records: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    url = weaver.url.replace("http", "ws") + "/v1/agent"
    with connect(url, additional_headers={"Authorization": f"Bearer {weaver.token}"}) as ws:
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            name=f"bench-{tag}",
            capacity=Resources(cpu_millicores=64_000, memory_mib=65_536, disk_mib=10**6),
            runtimes=[Tier.PROCESS],
            labels={"bench": tag},
            taints={"bench": "yes"},
            price_per_hour=1.0,
        )
        ws.send(encode(hello))
        while not isinstance(decode_from_weaver(ws.recv(timeout=30)), Welcome):
            pass
        tenant = next(t for t in weaver.api.get("/v1/tenants").json()["items"])
        weaver.api.patch(f"/v1/tenants/{tenant['id']}", json={"allow_process_tier": True})
        placement = {"labels": {"bench": tag}, "tolerations": ["bench"]}
        function = {
            "name": "metered",
            "command": ["true"],
            "isolation": "process",
            "placement": placement,
        }
        weaver.api.post("/v1/functions", json=function)
        for _ in range(50):
            weaver.api.post("/v1/functions/metered/invoke", json={})
        specs: list[Any] = []
        while len(specs) < 50:
            message = decode_from_weaver(ws.recv(timeout=30))
            if isinstance(message, Assign):
                specs.append(message.spec)
                ws.send(encode(Started(id=message.spec.id, attempt=message.spec.attempt)))
        now = time.time()
        made = [
            UsageRecord(
                kind="execution",
                id=specs[i % 50].id,
                generation=1,
                seq=i // 50 + 1,
                start=now - 1,
                end=now,
                wall_s=1.0,
                cpu_s=0.1,
            )
            for i in range(records)
        ]
        started = time.perf_counter()
        for at in range(0, records, 500):
            ws.send(encode(UsageReport(records=made[at : at + 500])))
        acked = 0
        while acked < records:
            message = decode_from_weaver(ws.recv(timeout=120))
            if isinstance(message, UsageAck):
                acked += len(message.keys)
        elapsed = time.perf_counter() - started
    return {
        "records": records,
        "seconds": round(elapsed, 3),
        "records_per_s": round(records / elapsed),
    }


def start_shuttle(weaver: Weaver, home: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TREADLE_SHUTTLE_TOKEN=weaver.token)
    argv = [PY, "-m", "treadle", "shuttle", "--weaver", weaver.url, "--home", str(home / name)]
    argv += ["--name", name, "--label", f"node={name}", *extra]
    shuttle = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    until(
        lambda: any(
            n["name"] == name and n["state"] == "ready"
            for n in weaver.api.get("/v1/nodes").json()["items"]
        ),
        60,
    )
    return shuttle


def shuttle_cpu(
    weaver: Weaver, home: Path, sandboxes: int, seconds: float, metering: bool
) -> dict[str, Any]:
    name = "idle-metered" if metering else "idle-unmetered"
    extra = ["--runtime", "namespace", "--cpu", "1000000", "--memory", "1000000"]
    extra += ["--usage-interval", "5"] if metering else ["--no-metering"]
    shuttle = start_shuttle(weaver, home, name, *extra)
    try:
        ids = []
        for _ in range(sandboxes):
            body = {
                "resources": {"cpu_millicores": 10, "memory_mib": 64, "disk_mib": 64},
                "placement": {"labels": {"node": name}},
                "timeout_s": 3600,
            }
            created = weaver.api.post("/v1/sandboxes", json=body)
            if created.status_code != 201:
                raise RuntimeError(f"cannot create a sandbox: {created.text}")
            ids.append(created.json()["id"])
        for sandbox_id in ids:
            until(
                lambda s=sandbox_id: (
                    weaver.api.get(f"/v1/sandboxes/{s}").json()["status"] == "running"
                ),
                300,
            )
        time.sleep(10)  # settled: every sandbox metered at least once
        before = cpu_seconds(shuttle.pid)
        time.sleep(seconds)
        used = cpu_seconds(shuttle.pid) - before
        for sandbox_id in ids:
            weaver.api.delete(f"/v1/sandboxes/{sandbox_id}")
        for sandbox_id in ids:
            until(
                lambda s=sandbox_id: (
                    weaver.api.get(f"/v1/sandboxes/{s}").json()["status"] in ("stopped", "failed")
                ),
                300,
            )
        return {
            "metering": metering,
            "sandboxes": sandboxes,
            "shuttle_cpu_s": round(used, 3),
            "shuttle_cores": round(used / seconds, 4),
        }
    finally:
        shuttle.terminate()
        shuttle.wait(60)


def dispatch(weaver: Weaver, home: Path, seconds: float, clients: int) -> dict[str, Any]:
    tenant = next(t for t in weaver.api.get("/v1/tenants").json()["items"])
    weaver.api.patch(f"/v1/tenants/{tenant['id']}", json={"allow_process_tier": True})
    shuttles = {
        metering: start_shuttle(
            weaver,
            home,
            f"dispatch-{'metered' if metering else 'unmetered'}",
            "--allow-process-runtime",
            "--runtime",
            "process",
            *([] if metering else ["--no-metering"]),
        )
        for metering in (True, False)
    }
    for metering in shuttles:
        node = f"dispatch-{'metered' if metering else 'unmetered'}"
        function = {
            "name": node,
            "command": ["true"],
            "isolation": "process",
            "placement": {"labels": {"node": node}},
        }
        weaver.api.post("/v1/functions", json=function)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    try:
        for metering in (False, True, False, True):
            name = f"dispatch-{'metered' if metering else 'unmetered'}"
            runs[metering].append(closed_loop(weaver, name, seconds, clients))
    finally:
        for shuttle in shuttles.values():
            shuttle.terminate()
            shuttle.wait(60)
    summary = {}
    for metering, phases in runs.items():
        latencies = sorted(x for phase in phases for x in phase.pop("latencies"))
        done = sum(phase["executions"] for phase in phases)
        summary["metered" if metering else "unmetered"] = {
            "executions": done,
            "per_s": round(done / sum(phase["seconds"] for phase in phases), 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            "phases_per_s": [phase["per_s"] for phase in phases],
        }
    summary["ratio"] = round(summary["metered"]["per_s"] / summary["unmetered"]["per_s"], 3)
    return summary


def closed_loop(weaver: Weaver, function: str, seconds: float, clients: int) -> dict[str, Any]:
    import threading

    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    def client() -> None:
        with httpx.Client(
            base_url=weaver.url, headers={"Authorization": f"Bearer {weaver.key}"}, timeout=60
        ) as api:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                answer = api.post(f"/v1/functions/{function}/invoke?wait=30", json={})
                if answer.status_code != 200 or answer.json().get("state") != "success":
                    failures.append(answer.text[:200])
                    continue
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"{len(failures)} invocations failed, e.g. {failures[0]}")
    return {
        "executions": len(latencies),
        "seconds": elapsed,
        "per_s": round(len(latencies) / elapsed, 1),
        "latencies": latencies,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--dispatch-seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="treadle-bench-metering-"))
    weaver = Weaver(root / "weaver", args.database_url)
    try:
        report: dict[str, Any] = {"ledger": ledger_rate(weaver, args.records)}
        report["dispatch"] = dispatch(weaver, root, args.dispatch_seconds, args.clients)
        report["idle_node"] = [
            shuttle_cpu(weaver, root, args.sandboxes, args.seconds, metering)
            for metering in (True, False)
        ]
    finally:
        weaver.stop()
        shutil.rmtree(root, ignore_errors=True)
    metered, unmetered = report["idle_node"]
    report["sampling_cores"] = round(metered["shuttle_cores"] - unmetered["shuttle_cores"], 4)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
