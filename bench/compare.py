"""treadle beside its peers, in one run on one machine: the table of docs/benchmarks.md.

    .venv/bin/python bench/compare.py [--seconds 10] [--quick]

Runs, one after another so they never share the CPUs: bench/peers.py (Ray, Celery + Redis,
a spawn per task), bench/dispatch.py --store sqlite and --store postgresql (a real Shuttle,
the process tier, `/bin/echo 13`), and bench/control_plane.py on each store and with two
replicas (simulated nodes: Weaver alone), and again on each store with the database's CPU
set apart (`--database-cpu 1`: PostgreSQL on a core of its own, Weaver on the other, SQLite
given the same one). Prints the table as Markdown and writes every figure as JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def run(script: str, *args: str) -> dict[str, Any]:
    print(f"== {script} {' '.join(args)}", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return dict(json.loads(out[out.index("{") :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer sequential rounds")
    args = parser.parse_args()
    seq = "100" if args.quick else "500"
    secs = str(args.seconds)
    figures: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    figures["peers"] = run("peers.py", "--sequential", seq, "--tasks", "5000")
    for store in ("sqlite", "postgresql"):
        figures[f"dispatch-{store}"] = run(
            "dispatch.py", "--store", store, "--sequential", seq, "--seconds", secs
        )
        figures[f"control-{store}"] = run(
            "control_plane.py",
            "--store",
            store,
            "--sequential",
            seq,
            "--seconds",
            secs,
            *(["--fleet", "1000"] if store == "sqlite" else ["--fleet", "0"]),
        )
    figures["control-postgresql-x2"] = run(
        "control_plane.py",
        "--store",
        "postgresql",
        "--replicas",
        "2",
        "--sequential",
        seq,
        "--seconds",
        secs,
        "--fleet",
        "0",
    )
    for store in ("sqlite", "postgresql"):
        figures[f"control-{store}-own-cpu"] = run(
            "control_plane.py",
            *("--store", store, "--sequential", seq, "--seconds", secs, "--fleet", "0"),
            *("--database-cpu", "1"),
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"compare-{int(time.time())}.json").write_text(json.dumps(figures, indent=2))
    print(table(figures))


def table(f: dict[str, Any]) -> str:
    peers = f["peers"]
    spawn = peers["spawn"]["tasks_per_s"]
    ray = peers["ray"]["tasks_per_s"]

    def row(what: str, p50: float | None, rate: float) -> str:
        p = "" if p50 is None else f"{p50:.1f} ms"
        return f"| {what} | {p} | {rate:,.0f}/s | {rate / spawn:.2f} | {rate / ray:.2f} |"

    lines = [
        "| same machine, same run | round trip p50 | sustained | ÷ spawn | ÷ Ray |",
        "| --- | --- | --- | --- | --- |",
        row(peers["ray"]["what"], peers["ray"]["sequential"]["p50_ms"], ray),
        row(
            peers["celery"]["what"],
            peers["celery"]["sequential"]["p50_ms"],
            peers["celery"]["tasks_per_s"],
        ),
        row(peers["spawn"]["what"], peers["spawn"]["sequential"]["p50_ms"], spawn),
    ]
    for store in ("sqlite", "postgresql"):
        d = f[f"dispatch-{store}"]
        lines.append(
            row(
                f"treadle, process tier, {store}, `?wait` (wrk -c1 / -c32)",
                d["round_trip"]["latency"]["p50_ms"] if d["round_trip"] else None,
                d["throughput"]["executions_per_s"],
            )
        )
    for key, label in (
        ("control-sqlite", "sqlite"),
        ("control-postgresql", "postgresql"),
        ("control-postgresql-x2", "postgresql, 2 replicas"),
        ("control-sqlite-own-cpu", "sqlite, one core"),
        ("control-postgresql-own-cpu", "postgresql, one core and one for the database"),
    ):
        if key not in f:
            continue
        c = f[key]
        lines.append(
            row(
                f"Weaver alone (simulated nodes), {label}, `?wait` (wrk -c32)",
                c["sequential"]["round_trip"]["p50_ms"],
                c["single"]["executions_per_s"],
            )
        )
        lines.append(
            row(
                f"Weaver alone, {label}, batch invoke (SDK map, 4 batches of 1,000)",
                None,
                c["batch"]["executions_per_s"],
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
