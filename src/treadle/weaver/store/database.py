"""The database seam: every statement goes through `Database.read()` or
`Database.transaction()`, whose connections share one async `execute`.

SQLite runs inline on the event loop. A local SQLite statement takes microseconds, while
handing each one to a driver thread (aiosqlite) costs two cross-thread wake-ups; measured on
2 cores, that handoff capped dispatch at ~70 executions/s with the CPU spent in futex calls.
Inline, a write batch is also atomic with respect to the loop. PostgreSQL, where statements
cross the network, uses SQLAlchemy's asyncio engine (psycopg 3).

SQLite gets one writer connection that begins with BEGIN IMMEDIATE (so another process waits
for the lock instead of failing mid-transaction) and a separate autocommit reader; WAL lets
readers proceed beside the writer.
"""

from __future__ import annotations

import collections
import functools
import json
import keyword
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Engine,
    Executable,
    Float,
    Insert,
    Table,
    Update,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import StaticPool

__all__ = [
    "Conn",
    "Database",
    "Group",
    "JSONValue",
    "Read",
    "direct",
    "execute_groups",
    "execute_many",
    "json_text",
    "json_value",
    "sync_url",
]


class Conn(Protocol):
    """What store code sees of a connection."""

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]: ...


class _Inline:
    """An async face over a synchronous connection; never suspends."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]:
        return self._conn.execute(statement, parameters)

    def execute_many(self, statement: Insert | Update, rows: list[dict[str, Any]]) -> int:
        """`statement` once per row, straight through the driver (`_BulkPlan`)."""
        plan = _BulkPlan.of(statement, self._conn.dialect, rows[0].keys())
        if not plan.usable:
            return int(self._conn.execute(statement, rows).rowcount)
        cursor = self._conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            with _as_sqlalchemy_errors(self._conn.dialect, plan.sql):
                cursor.executemany(plan.sql, [plan.values(row) for row in rows])
            return int(cursor.rowcount)
        finally:
            cursor.close()


@contextmanager
def _as_sqlalchemy_errors(dialect: Any, *sql: str) -> Iterator[None]:
    """A driver's error raised as SQLAlchemy raises it (IntegrityError, OperationalError…),
    so that statements sent past SQLAlchemy fail as those sent through it: callers (a
    batch's retry on a key stored meanwhile, the writer's busy check) catch one kind. `sql`,
    the statements sent, is joined for the message only when one fails."""
    try:
        yield
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            "; ".join(sql),
            None,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=dialect.is_disconnect(exc, None, None),
            dialect=dialect,
        ) from exc


def json_text(value: Any) -> str:
    """A JSON column's value as stored (every store, every path): orjson's text, or
    json's for what orjson does not take (integers past 64 bits, keys that are not
    strings)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def json_value(text: str | bytes) -> Any:
    """A JSON column's value as read. orjson reads an integer past 64 bits as a float, so
    text with a run of 19 digits or more (such an integer, or merely a long number or
    string) goes to json, which reads every integer exactly."""
    if isinstance(text, bytes | bytearray):
        probe = text.decode()
    elif isinstance(text, str):
        probe = text
    else:  # what the driver gave is no text (SQLite hands back a stored number as one)
        return json.loads(text)  # its TypeError is what SQLAlchemy's SQLite JSON expects
    if _LONG_DIGITS.search(probe):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # what json wrote and orjson does not read (NaN)
        return json.loads(text)


_LONG_DIGITS = re.compile(r"\d{19}")


class JSONValue(JSON):
    """A JSON column that may hold a bare number (an execution's result). SQLite gives a
    column declared JSON numeric affinity, so it stored the text `1.0` as the integer 1
    and `2**70` as a float: on SQLite this column is declared TEXT, which keeps the text
    as written. PostgreSQL's json keeps it anyway."""

    cache_ok = True


@compiles(JSONValue, "sqlite")
def _json_value_as_text(_type: JSONValue, _compiler: Any, **_kw: Any) -> str:
    return "TEXT"


_NAMED = re.compile(r"%\((\w+)\)s")
_MAX_PLANS = 1024
S = TypeVar("S", bound=Executable)


class _BulkPlan:
    """An INSERT or UPDATE run for many rows at once, compiled once per set of keys.

    SQLAlchemy spends ~13 µs a row on an executemany (building each row's parameters through
    its type machinery); SQLite itself ~4. The hot bulk statements (a batch's executions, the
    events of a commit, deferred swaps) take this path: the same SQL, the same values, JSON
    serialized as SQLAlchemy's JSON type does (`json_text`, None as null): positional for
    SQLite's driver, by name for psycopg's.
    """

    _plans: dict[tuple[int, str, tuple[str, ...]], _BulkPlan] = {}

    def __init__(self, statement: Insert | Update, dialect: Any, keys: tuple[str, ...]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        self.sql = compiled.string
        self.named = compiled.positiontup is None
        # A named bind used twice is given once; a positional one, once per use.
        names = (
            list(dict.fromkeys(_NAMED.findall(self.sql)))
            if self.named
            else list(compiled.positiontup or ())
        )
        # Literals of the statement itself (`state == "open"`) are binds with a value.
        fixed = {name: bind.value for name, bind in compiled.binds.items() if name not in keys}
        # Columns left out that have a default: a constant one is filled in here; any other
        # (a function) leaves the statement to SQLAlchemy.
        self.usable = all(name in keys or name in compiled.binds for name in names)
        for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
            default = column.default if column.key not in keys else None
            if default is not None and getattr(default, "is_scalar", False):
                fixed[column.key] = default.arg  # type: ignore[attr-defined]
            elif column.key not in keys:
                self.usable = False
        self._order = [
            (
                name,
                fixed.get(name),
                isinstance(getattr(compiled.binds.get(name), "type", None), JSON),
            )
            for name in names
        ]
        self._statement = statement  # kept alive: its id() is the cache key
        # Whether psycopg, given these values, gives what SQLAlchemy would (`direct`): every
        # value a caller must give given (SQLAlchemy refuses a missing one, and NULL in its
        # place would read as a lost race), no RETURNING the caller did not ask for.
        self.direct = (
            self.usable
            and "POSTCOMPILE" not in self.sql
            and self.named
            and not getattr(compiled, "implicit_returning", None)
            and all(
                name in keys or not (is_json or compiled.binds[name].required)
                for name, _default, is_json in self._order
            )
            and _plain(compiled, dialect)
        )
        if self.direct:
            row = _row_class(tuple(entry.keyname for entry in compiled._result_columns))
            self.make_row: Any = lambda _cursor: row._make
        # On PostgreSQL, an INSERT of bound values and nothing more may go as a COPY.
        # A RETURNING of the key that SQLAlchemy adds itself reads nothing any caller of
        # these plans reads; one the statement asks for is read.
        self.copy = (
            _copy_of(self.sql, names, implicit=getattr(compiled, "implicit_returning", None))
            if self.usable
            and self.named
            and dialect.name == "postgresql"
            and not getattr(statement, "_returning", ())
            else None
        )

    @classmethod
    def of(cls, statement: Insert | Update, dialect: Any, keys: Iterable[str]) -> _BulkPlan:
        ordered = tuple(sorted(keys))
        key = (id(statement), dialect.name, ordered)
        plan = cls._plans.get(key)
        if plan is None or plan._statement is not statement:
            if len(cls._plans) >= _MAX_PLANS:  # statements built per call: a mistake, bounded
                cls._plans.clear()
            plan = cls._plans[key] = cls(statement, dialect, ordered)
        return plan

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            json_text(row[name]) if is_json else row.get(name, default)
            for name, default, is_json in self._order
        )

    def named_values(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            name: json_text(row[name]) if is_json else row.get(name, default)
            for name, default, is_json in self._order
        }


_PLAIN_INSERT = re.compile(
    r"INSERT INTO (\S+) \(([^()]*)\) VALUES \((.*?)\)(?P<returning> RETURNING [\w.]+)?"
)
_BIND = re.compile(r"%\((\w+)\)s(?:::\w+)?")


def _copy_of(sql: str, names: list[str], implicit: Any) -> str | None:
    """The COPY that stores what `sql` stores, given `names`' values in order: where `sql`
    is `INSERT INTO t (columns) VALUES (one bind each)`, each bind at most cast to its
    column's type (which a COPY's text is read as), with no clause after but the RETURNING
    SQLAlchemy adds itself (`implicit`); not one that conflicts may skip (ON CONFLICT)."""
    match = _PLAIN_INSERT.fullmatch(sql)
    if match is None or (match["returning"] and not implicit):
        return None
    table, columns, values = match.group(1, 2, 3)
    binds = [_BIND.fullmatch(value.strip()) for value in values.split(",")]
    if [bind and bind[1] for bind in binds] != names:
        return None
    return f"COPY {table} ({columns}) FROM STDIN"


def _plain(compiled: Any, dialect: Any) -> bool:
    """Whether SQLAlchemy would hand every bind of `compiled` to the driver as it is and
    every column it reads back as the driver gave it, under a name that can be an attribute.
    JSON binds `_BulkPlan` serializes as SQLAlchemy does; a boolean's bind processor only
    refuses what is not one, and the hot paths give booleans."""
    try:
        for bind in compiled.binds.values():
            if isinstance(bind.type, JSON | Boolean):
                continue
            if bind.type.dialect_impl(dialect).bind_processor(dialect) is not None:
                return False
        for entry in compiled._result_columns:
            name = entry.keyname
            if name != entry.name or not _ATTRIBUTE.match(name) or keyword.iskeyword(name):
                return False
            # A float column of a table is read as a float by both. (PostgreSQL's result
            # processor goes by the type the server names, known only once rows come.)
            if isinstance(entry.type, Float) and not entry.type.asdecimal:
                if any(isinstance(found, Column) for found in entry.objects):
                    continue
                return False
            if entry.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
                return False
    except (TypeError, ValueError, NotImplementedError):
        return False  # a type that cannot say without the server: SQLAlchemy's path
    return len({entry.keyname for entry in compiled._result_columns}) == len(
        compiled._result_columns
    )


_ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@functools.cache
def _row_class(names: tuple[str, ...]) -> Any:
    """A row as SQLAlchemy's reads: by position, by attribute, and `_mapping`."""
    base = collections.namedtuple("Row", names)  # type: ignore[misc]
    return type("Row", (base,), {"__slots__": (), "_mapping": property(base._asdict)})


_DIRECT = "treadle_direct"


def direct(statement: S) -> S:
    """`statement`, to be sent through psycopg itself on PostgreSQL: compiled once, without
    SQLAlchemy's execution and result machinery, which cost Weaver about twice psycopg's CPU
    a statement (`bench/pg_driver.py`). Only where psycopg gives what SQLAlchemy would
    (`_plain`); everywhere else, and on SQLite, it runs as any statement does. For the
    statements of the hot paths, built once (module constants), not per call."""
    return statement.execution_options(**{_DIRECT: True})


class _Rows:
    """What store code reads of a result, for rows that came straight from psycopg."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    fetchall = all

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when one or none was required")
        return self.first()

    def one(self) -> Any:
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        return self.one_or_none()

    def scalar(self) -> Any:
        return None if not self._rows else self._rows[0][0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]

    def scalars(self) -> _Rows:
        return _Rows([row[0] for row in self._rows], self.rowcount)


class _Driven:
    """A PostgreSQL connection of SQLAlchemy's, whose statements marked `direct` go
    through its psycopg connection itself; the same transaction either way. One task's, as
    the connection under it is: its statements one after another."""

    __slots__ = ("_aconn", "_cursor", "_driver", "dialect")

    def __init__(self, aconn: AsyncConnection) -> None:
        self._aconn = aconn
        self.dialect = aconn.dialect
        self._driver: Any = None
        self._cursor: Any = None

    async def driver(self) -> Any:
        """The psycopg connection under SQLAlchemy's, fetched once a turn and only when a
        statement needs it (fetching it costs a hop through SQLAlchemy's greenlet)."""
        if self._driver is None:
            self._driver = (await self._aconn.get_raw_connection()).driver_connection
        return self._driver

    async def execute(self, statement: Executable, parameters: Any = None) -> Any:
        if not isinstance(parameters, list) and statement._execution_options.get(_DIRECT):
            keys = () if parameters is None else parameters.keys()
            plan = _BulkPlan.of(statement, self.dialect, keys)  # type: ignore[arg-type]
            if plan.direct:
                # One cursor for the connection's turn: its rows are all read before the next.
                cursor = self._cursor
                if cursor is None:
                    cursor = self._cursor = (await self.driver()).cursor()
                cursor.row_factory = plan.make_row
                # A connection found dead leaves the pool as on SQLAlchemy's own path: its
                # reset, when handed back, fails.
                with _as_sqlalchemy_errors(self.dialect, plan.sql):
                    await cursor.execute(plan.sql, plan.named_values(parameters or {}))
                    rows = await cursor.fetchall() if cursor.pgresult.nfields else []
                return _Rows(rows, cursor.rowcount)
        return await self._aconn.execute(statement, parameters)


async def execute_many(conn: Conn, statement: Insert | Update, rows: list[dict[str, Any]]) -> int:
    """Run `statement` for each of `rows` (all with the same keys): how many rows it changed.
    One driver call on SQLite (`_BulkPlan`); on PostgreSQL a COPY where it can be one
    (`COPY_FROM`), else one `executemany` (psycopg pipelines it: one round trip)."""
    if isinstance(conn, _Inline) and len(rows) > 1:
        return conn.execute_many(statement, rows)
    if isinstance(conn, _Driven) and len(rows) >= COPY_FROM:
        sent = await _driven_groups(conn, [(statement, rows)])
        if sent is not None:
            return sent[0][0]
    return int((await conn.execute(statement, rows if len(rows) > 1 else rows[0])).rowcount)


Group = tuple[Insert | Update, list[dict[str, Any]]]
# Rows from which an INSERT's group goes as a COPY on PostgreSQL. A row in a pipelined
# `executemany` costs Weaver ~12 µs of CPU, in a COPY ~3 (`bench/pg_driver.py`), but a COPY
# cannot share the pipeline's round trip: a round trip of its own is worth it for a few
# rows only.
COPY_FROM = 16


# A read sent after a transaction's groups: a `direct` SELECT and its parameters.
Read = tuple[Executable, dict[str, Any]]


async def execute_groups(
    conn: Conn, groups: list[Group], read: Read | None = None
) -> tuple[list[int], list[Any]]:
    """Each group's statement for each of its rows (each group's rows with the same keys),
    group after group, then `read`: how many rows each group changed, and the rows read. On
    PostgreSQL, consecutive groups (and the read after the last) go in one pipeline, one
    round trip for them all, instead of one each; an INSERT's group of many rows goes as a
    COPY between them (a round trip of its own)."""
    if isinstance(conn, _Driven) and (groups or read):
        sent = await _driven_groups(conn, groups, read)
        if sent is not None:
            return sent
    counts = [await execute_many(conn, statement, rows) for statement, rows in groups]
    return counts, [] if read is None else list((await conn.execute(*read)).all())


async def _driven_groups(
    conn: _Driven, groups: list[Group], read: Read | None = None
) -> tuple[list[int], list[Any]] | None:
    """`execute_groups` past SQLAlchemy, or None where a statement needs SQLAlchemy's."""
    plans = [_BulkPlan.of(statement, conn.dialect, rows[0].keys()) for statement, rows in groups]
    if not all(plan.usable for plan in plans):
        return None
    then = None
    if read is not None:
        reading = _BulkPlan.of(read[0], conn.dialect, read[1].keys())  # type: ignore[arg-type]
        if not reading.direct:
            return None
        then = (reading, read[1])
    copies = [
        plan.copy is not None and len(rows) >= COPY_FROM
        for plan, (_, rows) in zip(plans, groups, strict=True)
    ]
    if len(groups) == 1 and not copies[0] and then is None:
        return None  # one group gains nothing from a pipeline
    driver = await conn.driver()
    counts: list[int] = []
    read_rows: list[Any] = []
    read_sent = False
    start = 0
    while start < len(groups):
        end = start + 1
        while end < len(groups) and not copies[start] and not copies[end]:
            end += 1
        run = list(zip(plans[start:end], groups[start:end], strict=True))
        if copies[start]:
            counts.append(await _copy(driver, conn.dialect, *run[0]))
        else:
            read_sent = end == len(groups)
            sent, read_rows = await _pipeline(
                driver, conn.dialect, run, then if read_sent else None
            )
            counts.extend(sent)
        start = end
    if then is not None and not read_sent:  # no groups, or a COPY last
        read_rows = (await _pipeline(driver, conn.dialect, [], then))[1]
    return counts, read_rows


async def _copy(driver: Any, dialect: Any, plan: _BulkPlan, group: Group) -> int:
    assert plan.copy is not None
    async with driver.cursor() as cursor:
        with _as_sqlalchemy_errors(dialect, plan.copy):
            async with cursor.copy(plan.copy) as copy:
                for row in group[1]:
                    await copy.write_row(plan.values(row))
        return int(cursor.rowcount)


async def _pipeline(
    driver: Any,
    dialect: Any,
    run: list[tuple[_BulkPlan, Group]],
    then: tuple[_BulkPlan, dict[str, Any]] | None = None,
) -> tuple[list[int], list[Any]]:
    cursors = [driver.cursor() for _ in run]
    reader = None if then is None else driver.cursor()
    sqls = [plan.sql for plan, _group in run] + ([] if then is None else [then[0].sql])
    try:
        with _as_sqlalchemy_errors(dialect, *sqls):
            async with driver.pipeline():
                for (plan, (_statement, rows)), cursor in zip(run, cursors, strict=True):
                    values = [plan.named_values(row) for row in rows]
                    await cursor.executemany(plan.sql, values)
                if reader is not None and then is not None:
                    reading, parameters = then
                    reader.row_factory = reading.make_row
                    await reader.execute(reading.sql, reading.named_values(parameters))
            read = [] if reader is None else await reader.fetchall()
        return [int(cursor.rowcount) for cursor in cursors], read
    finally:
        for cursor in cursors if reader is None else [*cursors, reader]:
            await cursor.close()


def sync_url(url: str) -> str:
    """The synchronous driver URL for a configured one (migrations and inline SQLite)."""
    return url.replace("sqlite+aiosqlite", "sqlite").replace("+asyncpg", "+psycopg")


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        _set_pragmas(dbapi_connection, busy_timeout_ms)

    return on_connect


def _set_pragmas(dbapi_connection: Any, busy_timeout_ms: int) -> None:
    # Manual transaction control, so that BEGIN IMMEDIATE below is what starts them.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # NORMAL is crash-safe in WAL mode (a killed process loses nothing committed); only a
    # power loss can drop the last transactions.
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        f"busy_timeout={busy_timeout_ms}",
        "foreign_keys=ON",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


# Every engine writes and reads JSON columns the same way.
_JSON: dict[str, Any] = {"json_serializer": json_text, "json_deserializer": json_value}
# PostgreSQL reads kept open at once (see `Database`): with the writer's, at most 32
# connections a replica, so three replicas fit PostgreSQL's default max_connections (100).
_READ_POOL = 20


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._sqlite_write: Engine | None = None
        self._sqlite_read: Engine | None = None
        self._async: AsyncEngine | None = None
        self._async_read: AsyncEngine | None = None
        self._ignoring: dict[tuple[str, str | None], Any] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            plain = sync_url(url)
            self._sqlite_write = create_engine(plain, poolclass=StaticPool, **_JSON)
            self._sqlite_read = create_engine(plain, poolclass=StaticPool, **_JSON)
            # The writer must not wait inside SQLite for a lock another process holds: that
            # wait would stop the whole event loop. It is told at once and retries with
            # asyncio.sleep (Writer). Readers in WAL mode are rarely locked out at all.
            event.listen(self._sqlite_write, "connect", _sqlite_pragmas(busy_timeout_ms=10))
            event.listen(self._sqlite_read, "connect", _sqlite_pragmas(busy_timeout_ms=5000))
            event.listen(self._sqlite_write, "begin", _begin_immediate)
        else:
            # The writer holds one connection at a time; a few more for what else writes.
            self._async = create_async_engine(url, pool_size=4, max_overflow=4, **_JSON)
            # Its own pool: a connection switched to autocommit and back costs round trips.
            # Kept large enough for the reads of a busy API (each `?wait` ends in one): a
            # connection past the pool is opened and closed per read, which costs the server
            # a backend process each time.
            self._async_read = create_async_engine(
                url, pool_size=_READ_POOL, max_overflow=4, isolation_level="AUTOCOMMIT", **_JSON
            )

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Conn]:
        if self._sqlite_read is not None:
            with self._sqlite_read.connect() as conn:
                yield _Inline(conn)
                conn.rollback()
            return
        # Autocommit, as the SQLite reader: a read is its statements, each on the latest
        # committed state, not BEGIN … ROLLBACK around them (two more round trips each).
        assert self._async_read is not None
        async with self._async_read.connect() as aconn:
            yield _Driven(aconn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        if self._sqlite_write is not None:
            with self._sqlite_write.begin() as conn:
                yield _Inline(conn)
            return
        assert self._async is not None
        async with self._async.begin() as aconn:
            yield _Driven(aconn)

    def is_busy(self, exc: BaseException) -> bool:
        """Whether `exc` says another connection holds the lock (so trying again may work)."""
        if self.dialect != "sqlite" or not isinstance(exc, OperationalError):
            return False
        message = str(exc.orig).lower()
        return "locked" in message or "busy" in message

    def insert_ignoring_conflicts(self, table: Table, returning: Column[Any] | None = None) -> Any:
        """INSERT … ON CONFLICT DO NOTHING, for idempotent stores; with `returning`, that
        column of a row stored (none when it was there before). Built once each, `direct`."""
        key = (table.name, None if returning is None else returning.name)
        statement = self._ignoring.get(key)
        if statement is None:
            dialect = postgresql if self.dialect == "postgresql" else sqlite
            statement = dialect.insert(table).on_conflict_do_nothing()
            if returning is not None:
                statement = statement.returning(returning)
            statement = self._ignoring[key] = direct(statement)
        return statement

    async def close(self) -> None:
        for engine in (self._sqlite_write, self._sqlite_read):
            if engine is not None:
                engine.dispose()
        for async_engine in (self._async, self._async_read):
            if async_engine is not None:
                await async_engine.dispose()
