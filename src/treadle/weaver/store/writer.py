"""Group commit: every write goes through one queue; the writer runs whatever is queued in
one transaction, records the events it emitted in the same transaction (outbox), commits, and
only then publishes them and resolves the callers.

A batch that raises is rolled back and its writes are retried one transaction each, so one
bad write fails alone and never takes its neighbours with it.

Compare-and-swap updates that nearly always succeed (a node's report on an attempt it holds,
an assignment of claimed work) can be deferred (`Tx.swap`): they are taken to succeed, and
sent together, one statement shape at a time (`executemany`: one round trip on PostgreSQL,
where a batch's statements one by one cost a round trip each), before anything else reads or
writes and before the commit. Each must change exactly one row; if any does not, the batch is
rolled back and every write in it is run again alone, with its swaps done at once and
answered truly. Two swaps of one row keep their order.

A transaction that ends an execution a request of this replica waits for reads its row back
before it commits, one statement for all of them, and hands it to the waiter (`finals`).

Inserts whose outcome no write looks at (a new execution's row, output chunks) can be
deferred the same way (`Tx.insert_later`): they go out first, one `executemany` per statement
in the order each statement was first used, then the swaps. An insert that fails fails the
batch, which is then run write by write, each insert at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from treadle.domain.errors import Unavailable
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.events.bus import BusEvent, EventBus
from treadle.weaver.ids import EVENT, new_id, new_serial
from treadle.weaver.store import tables
from treadle.weaver.store.database import (
    Conn,
    Database,
    Group,
    Read,
    execute_groups,
    execute_many,
)
from treadle.weaver.store.finals import Finals, final_rows

__all__ = ["SwapMissed", "Tx", "WriteFn", "Writer"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class SwapMissed(Exception):
    """A deferred compare-and-swap changed no row: the batch is run again, write by write."""


def _shape(statement: Any, row: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    """What rows one `executemany` may take together: one statement, the same columns."""
    return id(statement), tuple(sorted(row))


class _Deferring:
    """The transaction's connection as write functions see it: anything sent through it
    first sends the swaps deferred until then, so every statement sees what came before."""

    __slots__ = ("_conn", "_inserts", "_swaps")

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        # Per row, its swaps in order: (statement, parameters).
        self._swaps: dict[Any, list[tuple[Any, dict[str, Any]]]] = {}
        # Per statement and set of columns, its rows in order.
        self._inserts: dict[tuple[int, tuple[str, ...]], Group] = {}

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        await self.flush()
        return await self._conn.execute(statement, parameters)

    def defer(self, row: Any, statement: Any, parameters: dict[str, Any]) -> None:
        self._swaps.setdefault(row, []).append((statement, parameters))

    def defer_insert(self, statement: Any, row: dict[str, Any]) -> None:
        self._inserts.setdefault(_shape(statement, row), (statement, []))[1].append(row)

    async def flush(
        self, inserts: list[Group] | None = None, read: Read | None = None
    ) -> list[Any]:
        """Send the deferred inserts and the groups of `inserts` (whose rows no swap
        touches), then the deferred swaps: the first of each row's together, then the
        second, …; each an `executemany` per statement and set of columns; then `read`,
        whose rows it returns. On PostgreSQL in one round trip, but for a COPY's own
        (`execute_groups`)."""
        groups: list[Group] = [*self._inserts.values(), *(inserts or ())]
        self._inserts = {}
        pending, self._swaps = self._swaps, {}
        swaps_from = len(groups)
        rounds = max((len(swaps) for swaps in pending.values()), default=0)
        for turn in range(rounds):
            shapes: dict[tuple[int, tuple[str, ...]], Group] = {}
            for swaps in pending.values():
                if turn < len(swaps):
                    statement, parameters = swaps[turn]
                    shapes.setdefault(_shape(statement, parameters), (statement, []))[1].append(
                        parameters
                    )
            groups.extend(shapes.values())
        if not groups and read is None:
            return []
        changed, rows = await execute_groups(self._conn, groups, read)
        for count, (_statement, many) in zip(
            changed[swaps_from:], groups[swaps_from:], strict=True
        ):
            if count != len(many):
                raise SwapMissed(f"{len(many) - count} of {len(many)} swaps missed")
        return rows

    async def execute_many(self, statement: Any, rows: list[dict[str, Any]]) -> int:
        await self.flush()
        return await execute_many(self._conn, statement, rows)


@dataclass(slots=True)
class Tx:
    """What a write function gets: the connection of the open transaction, and a place to
    emit events (stored with the transaction) or notifications (published only)."""

    conn: Conn
    db: Database
    now: float
    events: list[BusEvent] = field(default_factory=list)
    stored: list[dict[str, Any]] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    notified_once: set[tuple[str, str]] = field(default_factory=set)
    # What writes of this transaction tell later ones of it, before it commits (forgotten
    # if it does not).
    scratch: dict[Any, Any] = field(default_factory=dict)
    # What undoes, in memory, what writes did for a transaction that then did not commit.
    undo: list[Callable[[], None]] = field(default_factory=list)
    # Whether `swap` may defer (see the module's docstring); off when a batch is run again.
    optimistic: bool = False
    finals: Finals | None = None
    # Executions this transaction ended that a request of this replica waits for.
    read_back: set[str] = field(default_factory=set)

    def ended(self, execution_id: str) -> None:
        """`execution_id` ended, or what is stored of its end changed, in this transaction."""
        if self.finals is not None and self.finals.wants(execution_id):
            self.read_back.add(execution_id)

    async def insert_many(self, statement: Any, rows: list[dict[str, Any]]) -> None:
        """`statement` (an INSERT) for each of `rows`, all with the same keys, at once."""
        conn = self.conn
        if isinstance(conn, _Deferring):
            await conn.execute_many(statement, rows)
        else:
            await conn.execute(statement, rows)

    async def insert_later(self, statement: Any, row: dict[str, Any]) -> None:
        """`statement` (an INSERT whose outcome nothing looks at) for `row`: deferred when
        the batch may be (see the module's docstring), else at once."""
        conn = self.conn
        if self.optimistic and isinstance(conn, _Deferring):
            conn.defer_insert(statement, row)
        else:
            await conn.execute(statement, row)

    async def swap(self, row: Any, statement: Any, parameters: dict[str, Any]) -> bool:
        """A compare-and-swap `statement` on `row` (its key) expected to change it: True when
        it did, or, deferred, once it will have (the commit fails otherwise)."""
        conn = self.conn
        if self.optimistic and isinstance(conn, _Deferring):
            conn.defer(row, statement, parameters)
            return True
        result = await conn.execute(statement, parameters)
        return bool(result.rowcount == 1)

    def emit(self, type: str, subject_id: str, tenant_id: str | None, data: dict[str, Any]) -> None:
        event = BusEvent(
            id=new_id(EVENT),
            type=type,
            topic=f"{type.split('.', 1)[0]}.{subject_id}",
            subject_id=subject_id,
            tenant_id=tenant_id,
            data=data,
            created_at=self.now,
        )
        self.events.append(event)
        self.stored.append(
            {
                "id": event.id,
                "type": type,
                "tenant_id": tenant_id,
                "subject_id": subject_id,
                "data": data,
                "created_at": self.now,
            }
        )

    def notify(self, topic: str, subject_id: str, data: dict[str, Any]) -> None:
        self.events.append(
            BusEvent(
                id=new_serial("nt"),
                type="notify",
                topic=topic,
                subject_id=subject_id,
                data=data,
                created_at=self.now,
            )
        )

    def notify_once(self, topic: str, subject_id: str, data: dict[str, Any]) -> None:
        """`notify`, unless this transaction already did for the same topic and subject."""
        if (topic, subject_id) not in self.notified_once:
            self.notified_once.add((topic, subject_id))
            self.notify(topic, subject_id, data)


_INSERT_EVENTS = tables.events.insert()
# How long a write waits for a lock another process holds before it fails.
_BUSY_LIMIT_S = 30.0
WriteFn = Callable[[Tx], Awaitable[T]]
_Item = tuple[WriteFn[Any], "asyncio.Future[Any]"]


class Writer:
    def __init__(
        self, db: Database, bus: EventBus, max_batch: int = 512, finals: Finals | None = None
    ) -> None:
        self._db = db
        self._bus = bus
        self._finals = finals
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: list[_Item] = []  # the batch being committed
        # how often a commit waited for a lock held by another process
        self.busy_waits = 0
        # how often a batch was run again, write by write, because a deferred swap missed
        self.swaps_missed = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="treadle-writer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        # Whoever waits on a write the writer will not run now hears so, and never waits on.
        stopped = Unavailable("the store's writer stopped; the write may not have been stored")
        for item in self._in_flight:
            self._fail(item, stopped)
        self._in_flight = []
        while not self._queue.empty():
            self._fail(self._queue.get_nowait(), stopped)

    def submit(self, fn: WriteFn[T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, future))
        return future

    async def run(self, fn: WriteFn[T]) -> T:
        return await self.submit(fn)

    async def decided(self, fn: WriteFn[T]) -> T:
        """`run`, for a caller that holds a lock across the write (a tenant's admission). A
        queued write runs even when its caller is cancelled; cancelled (once or again), this
        caller still waits until the write has committed or failed, or the writer has
        stopped, so that the lock never lets the next caller read the store before the write
        it guards is in it."""
        future = self.submit(fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
            raise

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_flight = batch
            await self._run_batch(batch)
            self._in_flight = []

    async def _run_batch(self, batch: list[_Item]) -> None:
        try:
            await self._commit_when_free(batch, optimistic=True)
        except Exception as exc:
            # One item at a time only finds a bad item; a lock held past the limit is
            # nobody's fault and would just be waited out again, item by item. A swap
            # that missed is nobody's fault either, but whose it was, only one at a time
            # tells.
            missed = isinstance(exc, SwapMissed)
            if (len(batch) == 1 and not missed) or self._db.is_busy(exc):
                for item in batch:
                    self._fail(item, exc)
                return
            if missed:
                self.swaps_missed += 1
            for item in batch:
                try:
                    await self._commit_when_free([item], optimistic=False)
                except Exception as item_exc:
                    self._fail(item, item_exc)

    async def _commit_when_free(self, batch: list[_Item], *, optimistic: bool) -> None:
        """Commit, waiting (without blocking the loop) while another process holds the lock."""
        delay, deadline = 0.005, time.monotonic() + _BUSY_LIMIT_S
        while True:
            try:
                await self._commit(batch, optimistic)
                return
            except Exception as exc:
                if not self._db.is_busy(exc) or time.monotonic() > deadline:
                    raise
            self.busy_waits += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _commit(self, batch: list[_Item], optimistic: bool) -> None:
        results: list[Any] = []
        undo: list[Callable[[], None]] = []
        finals: list[Any] = []
        try:
            async with self._db.transaction() as conn:
                deferring = _Deferring(conn)
                tx = Tx(
                    conn=deferring,
                    db=self._db,
                    now=time.time(),
                    optimistic=optimistic,
                    finals=self._finals,
                )
                undo = tx.undo
                for fn, _future in batch:
                    results.append(await fn(tx))
                # The rows ended for this replica's waiters are read after everything else,
                # in the same round trip on PostgreSQL.
                read: Read | None = None
                if tx.read_back:
                    read = (final_rows(self._db.dialect), {"_ids": list(tx.read_back)})
                finals = await deferring.flush(
                    [(_INSERT_EVENTS, tx.stored)] if tx.stored else None, read
                )
        except BaseException:
            for callback in reversed(undo):
                try:
                    callback()
                except Exception:
                    log.exception("undoing a write that did not commit failed")
            raise
        await self._settle(batch, results, tx, finals)

    async def _settle(
        self, batch: list[_Item], results: list[Any], tx: Tx, finals: list[Any]
    ) -> None:
        """After the commit: a failure here must not fail the batch, or its writes, already
        stored, would be retried."""
        if finals and self._finals is not None:
            # Before the events that wake the waiters.
            self._finals.keep(finals)
        for callback in tx.after_commit:
            try:
                callback()
            except Exception:
                log.exception("an after-commit callback failed")
        if tx.events:
            try:
                await self._bus.publish(tx.events)
            except Exception:
                log.exception("publishing %d events failed", len(tx.events))
        for (_fn, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(item: _Item, exc: BaseException) -> None:
        future = item[1]
        if not future.done():
            future.set_exception(exc)
