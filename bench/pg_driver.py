"""What one statement costs Weaver's process on PostgreSQL, by the way it is sent: through
SQLAlchemy's asyncio engine (as most of Weaver's statements go), through psycopg alone,
inside a psycopg pipeline (as a transaction's deferred writes go), and through treadle's
`Database` as a statement of its own and marked `direct` (as the hot paths' go), an update
and a read of a row with JSON each; and a row inserted 500 at a time, in a pipeline and as a
COPY (as a commit's events and a batch's executions go). CPU of this process only; the
server's is apart.

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
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, bindparam, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from servers import database_for
from treadle.weaver.store.database import Database, direct, execute_many

# Rows inserted a transaction, as a busy commit's events.
_GROUP = 500


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(url: str, n: int) -> dict[str, Any]:
    table = Table(
        "t",
        MetaData(),
        Column("id", String, primary_key=True),
        Column("n", Integer),
        Column("doc", JSON),
    )
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
        rows = [
            {"id": f"k{i}", "n": 0, "doc": {"args": {"i": i}, "tags": ["a"]}} for i in range(100)
        ]
        await conn.execute(table.insert(), rows)
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
        rows = [(f"i{i}", '{"args": {"i": 1}, "tags": ["a"]}', 1.5) for i in range(n)]
        await raw.execute("CREATE TABLE e (id text PRIMARY KEY, doc json, at float8)")
        await raw.commit()
        cpu, wall = _cpu(), time.perf_counter()
        for start in range(0, n, _GROUP):
            async with raw.transaction(), raw.pipeline():
                await raw.cursor().executemany(
                    "INSERT INTO e (id, doc, at) VALUES (%s, %s, %s)",
                    [(f"p{key}", doc, at) for key, doc, at in rows[start : start + _GROUP]],
                )
        record("psycopg_pipeline_insert", cpu, wall)
        cpu, wall = _cpu(), time.perf_counter()
        for start in range(0, n, _GROUP):
            async with (
                raw.transaction(),
                raw.cursor().copy("COPY e (id, doc, at) FROM STDIN") as copy,
            ):
                for row in rows[start : start + _GROUP]:
                    await copy.write_row(row)
        record("psycopg_copy_insert", cpu, wall)
    await engine.dispose()
    db = Database(url)
    cpu, wall = _cpu(), time.perf_counter()
    for start in range(0, n, _GROUP):
        async with db.transaction() as conn:
            docs = [{"id": f"m{i}", "n": i, "doc": {"i": i}} for i in range(start, start + _GROUP)]
            await execute_many(conn, table.insert(), docs)
    record("treadle_insert_many", cpu, wall)
    read = select(table).where(table.c.id == bindparam("_id"))
    ways = (("treadle", statement, read), ("treadle_direct", direct(statement), direct(read)))
    for name, change, look in ways:
        cpu, wall = _cpu(), time.perf_counter()
        async with db.transaction() as conn:
            for i in range(n):
                await conn.execute(change, {"_id": f"k{i % 100}"})
        record(f"{name}_update", cpu, wall)
        cpu, wall = _cpu(), time.perf_counter()
        async with db.read() as conn:
            for i in range(n):
                (await conn.execute(look, {"_id": f"k{i % 100}"})).one()
        record(f"{name}_read", cpu, wall)
    await db.close()
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
