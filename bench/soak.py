"""Chaos soak: the chaos of tests/integration/test_chaos.py, longer and bigger.

    .venv/bin/python bench/soak.py [--executions 5000] [--shuttles 3] [--seed 1]
                                   [--rounds 1 | --seconds 600] [--weaver-restarts 3]
                                   [--rate 60] [--fault-every 0.3 1.2]
                                   [--store sqlite|postgresql] [--database-url URL]

Each round starts a fresh Weaver and Shuttles (real processes on loopback) in a temporary
directory, submits the executions while Shuttles are SIGKILLed, links cut and Weaver
SIGKILLed at random (seeded), waits for every execution to end and checks that none was lost
or doubled, attempts stayed within max_attempts, and every success's stored output is exactly
what it printed (support/chaos.py). `--seconds` repeats rounds, with the next seed each time,
until that much time has passed. PostgreSQL: a private server is started unless
`--database-url` names one, on which each round creates a database of its own.

Prints one JSON report per round; exits 1 if any invariant was violated, keeping that
round's directory (logs: weaver.log, <node>.log) and printing what was violated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# The chaos driver lives with the tests' helpers (support/), which are not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.chaos import QUICK_SETTINGS, ChaosReport, run_chaos
from support.cluster import Cluster
from support.postgres import Postgres, postgres_binaries


class Databases:
    """A fresh database per round: on the server `url` names, or on a private one."""

    def __init__(self, url: str | None) -> None:
        self._url = url
        self._private: Postgres | None = None

    def __enter__(self) -> Databases:
        if self._url is None:
            binaries = postgres_binaries()
            if binaries is None:
                raise SystemExit("PostgreSQL is not installed; pass --database-url")
            self._private = Postgres(binaries).start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._private is not None:
            self._private.stop()

    def create(self) -> str:
        if self._private is not None:
            return self._private.create_database()
        assert self._url is not None
        server = make_url(self._url)
        name = f"treadle_soak_{uuid.uuid4().hex[:12]}"
        engine = create_engine(server, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return server.set(database=name).render_as_string(hide_password=False)


def one_round(args: argparse.Namespace, seed: int, databases: Databases | None) -> ChaosReport:
    settings = dict(QUICK_SETTINGS)
    if databases is not None:
        settings["database_url"] = databases.create()
    root = Path(tempfile.mkdtemp(prefix="treadle-soak-"))
    cluster = Cluster(root)
    try:
        report = run_chaos(
            cluster,
            settings=settings,
            executions=args.executions,
            shuttles=args.shuttles,
            seed=seed,
            weaver_restarts=args.weaver_restarts,
            rate=args.rate,
            fault_every_s=(args.fault_every[0], args.fault_every[1]),
            settle_timeout_s=args.settle_timeout,
        )
    finally:
        cluster.stop()
    if report.violations or args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executions", type=int, default=5000)
    parser.add_argument("--shuttles", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, help="repeat rounds until this much time passed")
    parser.add_argument("--weaver-restarts", type=int, default=3)
    parser.add_argument("--rate", type=float, default=60.0, help="invokes per second")
    parser.add_argument(
        "--fault-every",
        type=float,
        nargs=2,
        default=(0.3, 1.2),
        metavar=("MIN_S", "MAX_S"),
        help="seconds between faults, drawn uniformly",
    )
    parser.add_argument("--settle-timeout", type=float, default=600.0)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--database-url", help="a PostgreSQL server (SQLAlchemy URL)")
    parser.add_argument("--keep", action="store_true", help="keep each round's directory")
    args = parser.parse_args()
    if args.database_url and args.store != "postgresql":
        parser.error("--database-url needs --store postgresql")

    started = time.monotonic()
    failed = False
    counted = (
        "executions",
        "shuttle_kills",
        "link_cuts",
        "link_stalls",
        "weaver_restarts",
        "requeued",
    )
    totals = dict.fromkeys(("rounds", *counted, "violations"), 0)
    databases = Databases(args.database_url) if args.store == "postgresql" else None
    with contextlib.ExitStack() as stack:
        if databases is not None:
            stack.enter_context(databases)
        for round_no in range(sys.maxsize):
            if args.seconds is None and round_no >= args.rounds:
                break
            if args.seconds is not None and round_no and time.monotonic() - started > args.seconds:
                break
            report = one_round(args, args.seed + round_no, databases)
            print(json.dumps({"round": round_no, "store": args.store, **report.summary()}))
            totals["rounds"] += 1
            for key in counted:
                totals[key] += getattr(report, key)
            totals["violations"] += len(report.violations)
            if report.violations:
                failed = True
                print(report.explain(), file=sys.stderr)
    totals["seconds"] = round(time.monotonic() - started)
    print(json.dumps({"total": totals}))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
