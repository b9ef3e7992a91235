"""What removing old history costs: how long one retention pass holds the store's writer
(every other write waits behind it), and how fast a backlog goes, next to the same rows
removed by hand-written SQL straight through the driver in the same run.

    .venv/bin/python bench/retention.py [--store sqlite|postgresql] [--executions 20000]

Fills a fresh store with `--executions` executions that ended 40 days ago, each with two
output chunks and two events, and as many that ended an hour ago (kept); then:
  * treadle: `Retention.sweep` pass after pass, through a running `Writer`, until a pass
    removes nothing; each pass's wall time as the writer's caller sees it;
  * raw: the same store filled again, and the same deletes (500 rows of each kind a
    transaction) as hand-written SQL, one statement a kind, straight to the driver.
Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from servers import database_for
from treadle.weaver.events.bus import InProcessBus
from treadle.weaver.ids import EVENT, EXECUTION, first_id_at, new_id
from treadle.weaver.services.retention import CHUNK, Retention
from treadle.weaver.store import migrate, tables
from treadle.weaver.store.database import Database, sync_url
from treadle.weaver.store.writer import Writer

DAY = 86400.0


def _fill(url: str, n: int, now: float) -> None:
    engine = create_engine(sync_url(url))
    with engine.begin() as conn:
        conn.execute(tables.tenants.insert().values(id="tn_b", name="b", created_at=0.0))
    for start in range(0, n, 5000):
        executions, chunks, events = [], [], []
        for i in range(start, min(n, start + 5000)):
            for made in (now - 40 * DAY + i * 0.01, now - 3600 + i * 0.0001):
                ex = new_id(EXECUTION, at=made)
                executions.append(
                    {
                        "id": ex,
                        "tenant_id": "tn_b",
                        "function": "f",
                        "version": 1,
                        "state": "success",
                        "attempt": 1,
                        "max_attempts": 1,
                        "resources": {"cpu_millicores": 10},
                        "args": {"i": i},
                        "cancel_requested": False,
                        "output_truncated": False,
                        "created_at": made,
                        "ended_at": made + 0.005,
                    }
                )
                chunks += [
                    {"execution_id": ex, "attempt": 1, "seq": s, "stream": "stdout", "data": "x"}
                    for s in (0, 1)
                ]
                events += [
                    {
                        "id": new_id(EVENT, at=made),
                        "type": t,
                        "tenant_id": "tn_b",
                        "subject_id": ex,
                        "data": {"state": t},
                        "created_at": made,
                    }
                    for t in ("execution.running", "execution.success")
                ]
        with engine.begin() as conn:
            conn.execute(tables.executions.insert(), executions)
            conn.execute(tables.output_chunks.insert(), chunks)
            conn.execute(tables.events.insert(), events)
    engine.dispose()


async def _treadle(url: str, cutoff: float) -> dict[str, Any]:
    db = Database(url)
    writer = Writer(db, InProcessBus())
    writer.start()
    retention = Retention(writer, keep_s=30 * DAY)
    passes: list[float] = []
    removed = 0
    started = time.perf_counter()
    try:
        while True:
            t = time.perf_counter()
            counts = await retention.sweep(cutoff)
            if not any(counts.values()):
                break
            passes.append(time.perf_counter() - t)
            removed += counts["executions"]
    finally:
        await writer.stop()
        await db.close()
    return _summary(passes, removed, time.perf_counter() - started)


def _raw(url: str, cutoff: float) -> dict[str, Any]:
    """The same removal as hand-written SQL sent straight to the driver, one transaction a
    pass, each kind one statement (the ids chosen by a subquery, not read back)."""
    engine = create_engine(sync_url(url))
    mark = "?" if engine.dialect.name == "sqlite" else "%s"
    chosen = (
        f"SELECT id FROM executions WHERE id < {mark} AND state = 'success' "
        f"AND ended_at < {mark} ORDER BY id LIMIT {CHUNK}"
    )
    statements = [
        (f"DELETE FROM output_chunks WHERE execution_id IN ({chosen})", "ex"),
        (f"DELETE FROM executions WHERE id IN ({chosen})", "ex"),
        (
            f"DELETE FROM events WHERE seq IN "
            f"(SELECT seq FROM events WHERE id < {mark} ORDER BY id LIMIT {CHUNK})",
            "ev",
        ),
    ]
    cuts = {
        "ex": (first_id_at(EXECUTION, cutoff), cutoff),
        "ev": (first_id_at(EVENT, cutoff),),
    }
    passes: list[float] = []
    removed = 0
    started = time.perf_counter()
    with engine.connect() as conn:
        while True:
            t = time.perf_counter()
            with conn.begin():
                counts = [
                    conn.exec_driver_sql(sql, cuts[kind]).rowcount for sql, kind in statements
                ]
            if not any(counts):
                break
            passes.append(time.perf_counter() - t)
            removed += counts[1]
    engine.dispose()
    return _summary(passes, removed, time.perf_counter() - started)


def _summary(passes: list[float], removed: int, seconds: float) -> dict[str, Any]:
    ordered = sorted(passes)
    return {
        "passes": len(passes),
        "executions_removed": removed,
        "pass_ms_p50": round(statistics.median(ordered) * 1000, 1),
        "pass_ms_p99": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1),
        "executions_per_s": round(removed / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--executions", type=int, default=20_000)
    args = parser.parse_args()
    now = time.time()
    cutoff = now - 30 * DAY
    results: dict[str, Any] = {"store": args.store, "executions_old": args.executions}
    with tempfile.TemporaryDirectory() as home:
        for name in ("treadle", "raw"):
            with database_for(args.store) as pg_url:
                url = pg_url or f"sqlite:///{Path(home) / name}.db"
                migrate.upgrade(url)
                _fill(url, args.executions, now)
                if name == "treadle":
                    results[name] = asyncio.run(_treadle(url, cutoff))
                else:
                    results[name] = _raw(url, cutoff)
    treadle, raw = results["treadle"], results["raw"]
    results["pass_p50_ratio_to_raw"] = round(treadle["pass_ms_p50"] / raw["pass_ms_p50"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
