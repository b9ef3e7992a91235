"""Time from a node's SIGKILL to its executions running again on another node.

    .venv/bin/python bench/failover.py [--executions 20] [--rounds 3] [--down-after 3]

Starts its own Weaver and two Shuttles (real processes, SQLite, loopback), runs long
executions on node A, starts node B, SIGKILLs A's Shuttle and measures, per execution, the
time until its next attempt is `running` on B (from Weaver's timestamps). Detection is
bounded by `node_down_after_s`; the rest is re-placement and start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

_MARK = "treadle-failover-job"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit("timed out")


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "treadle", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def one_round(root: Path, executions: int, down_after: float) -> list[float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
    env.update(TREADLE_NODE_DOWN_AFTER_S=str(down_after), TREADLE_NODE_STARTUP_GRACE_S="0")
    procs = [
        spawn(["weaver", "--home", str(root / "w"), "--port", str(port)], env, root / "weaver.log")
    ]
    try:
        wait_for(lambda: _ok(url))
        key = (root / "w" / "admin.key").read_text().strip()
        shuttle_env = dict(
            env, TREADLE_SHUTTLE_TOKEN=(root / "w" / "join.token").read_text().strip()
        )

        def shuttle(name: str) -> subprocess.Popen[bytes]:
            return spawn(
                [
                    "shuttle",
                    "--weaver",
                    url,
                    "--home",
                    str(root / name),
                    "--name",
                    name,
                    "--allow-process-runtime",
                ],
                shuttle_env,
                root / f"{name}.log",
            )

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as api:
            a = shuttle("a")
            procs.append(a)
            wait_for(lambda: api.get("/v1/nodes").json()["items"])
            api.post(
                "/v1/functions",
                json={
                    "name": "long",
                    "command": ["/bin/bash", "-c", f"exec -a {_MARK} sleep 300"],
                    "resources": {"cpu_millicores": 10, "memory_mib": 8},
                },
            )
            ids = [
                api.post("/v1/functions/long/invoke", json={}).json()["id"]
                for _ in range(executions)
            ]
            wait_for(
                lambda: all(
                    api.get(f"/v1/executions/{i}").json()["state"] == "running" for i in ids
                )
            )
            procs.append(shuttle("b"))
            wait_for(lambda: len(api.get("/v1/nodes").json()["items"]) == 2)
            killed_at = time.time()
            a.send_signal(signal.SIGKILL)

            def moved() -> list[dict[str, Any]] | None:
                rows = [api.get(f"/v1/executions/{i}").json() for i in ids]
                done = all(r["attempt"] == 2 and r["state"] == "running" for r in rows)
                return rows if done else None

            rows = wait_for(moved, timeout=60)
            for execution_id in ids:
                api.post(f"/v1/executions/{execution_id}/cancel")
            return [ts(r["timestamps"]["running"]) - killed_at for r in rows]
    finally:
        # The killed node's own attempts outlive it (it was not there to kill them).
        subprocess.run(["pkill", "-f", _MARK], check=False)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ok(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--down-after", type=float, default=3.0)
    args = parser.parse_args()
    delays: list[float] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="treadle-failover-") as root:
            delays += one_round(Path(root), args.executions, args.down_after)
    ordered = sorted(delays)
    print(
        json.dumps(
            {
                "node_down_after_s": args.down_after,
                "executions": len(delays),
                "p50_s": round(statistics.median(ordered), 3),
                "p99_s": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
                "max_s": round(ordered[-1], 3),
                "min_s": round(ordered[0], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
