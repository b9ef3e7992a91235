"""What one statement costs Weaver's process on PostgreSQL, by the way it is sent: through
SQLAlchemy's asyncio engine (as most of Weaver's statements go), through psycopg alone, and
inside a psycopg pipeline (as a transaction's deferred writes go). CPU of this process only;
the server's is apart.

    .venv/bin/python bench/pg_driver.py [--statements 3000]

Starts a private PostgreSQL server (the tests' own); prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

import psycopg
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, update
from sqlalchemy.ext.asyncio import create_async_engine

from servers import database_for


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(url: str, n: int) -> dict[str, Any]:
    table = Table("t", MetaData(), Column("id", String, primary_key=True), Column("n", Integer))
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
        await conn.execute(table.insert(), [{"id": f"k{i}", "n": 0} for i in range(100)])
    statement = update(table).where(table.c.id == bindparam("_id")).values(n=table.c.n + 1)
    sql = "UPDATE t SET n = n + 1 WHERE id = %s"
    results: dict[str, Any] = {}

    def record(name: str, cpu: float, wall: float) -> None:
        results[name] = {
            "cpu_us_per_statement": round((_cpu() - cpu) / n * 1e6, 1),
            "wall_us_per_statement": round((time.perf_counter() - wall) / n * 1e6, 1),
        }

    cpu, wall = _cpu(), time.perf_counter()
    async with engine.begin() as conn:
        for i in range(n):
            await conn.execute(statement, {"_id": f"k{i % 100}"})
    record("sqlalchemy_asyncio", cpu, wall)
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(plain) as raw:
        cpu, wall = _cpu(), time.perf_counter()
        async with raw.transaction():
            cursor = raw.cursor()
            for i in range(n):
                await cursor.execute(sql, (f"k{i % 100}",))
        record("psycopg", cpu, wall)
        cpu, wall = _cpu(), time.perf_counter()
        async with raw.transaction(), raw.pipeline():
            cursor = raw.cursor()
            for i in range(n):
                await cursor.execute(sql, (f"k{i % 100}",))
        record("psycopg_pipeline", cpu, wall)
    await engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--statements", type=int, default=3000)
    args = parser.parse_args()
    with database_for("postgresql") as url:
        assert url is not None
        print(json.dumps(asyncio.run(_measure(url, args.statements)), indent=2))


if __name__ == "__main__":
    main()
