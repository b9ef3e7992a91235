"""Batch invoke (map): many executions of one function from one request, stored in one
transaction and placed together, their results gathered as they end.

A batch's items are checked one by one: an item that is invalid, too large or past the
tenant's quota is refused alone, with the error a single invoke would have given, and the
rest run. Only a batch malformed as a whole (no items, too many, an unknown function) is
refused whole. An item with an idempotency key that an execution already holds is answered
by that execution (`reused`), whichever batch or invoke made it; a batch's own key makes a
retried request return the batch first made.

The executions a batch made name it (`batch_id`, `batch_index`); when one ends, its
transition notifies `batch.{id}` (`transitions`), which is how results are gathered as they
end without a subscription per execution.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError

from treadle.domain.errors import Conflict, NotFound, PayloadTooLarge, TreadleError
from treadle.domain.execution import TERMINAL_STATES, ExecutionState, is_terminal
from treadle.domain.function import PresetStrategy, check_placeholders, placeholders
from treadle.weaver.events.bus import EventBus
from treadle.weaver.ids import BATCH, new_id
from treadle.weaver.services.executions import (
    ExecutionService,
    IdempotencyKey,
    InvokeRequest,
    fresh_execution,
    new_row,
)
from treadle.weaver.services.fleet import announce_open
from treadle.weaver.services.functions import FunctionRecord, FunctionService
from treadle.weaver.services.quotas import Admitted
from treadle.weaver.settings import WeaverSettings
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.writer import Tx, Writer
from treadle.weaver.views import RESULT_COLUMNS, result_view

__all__ = ["BatchService", "Created", "MapRequest", "item_error"]

_B = tables.batches
_E = tables.executions
_TERMINAL = sorted(state.value for state in TERMINAL_STATES)
# Executions read at a time while results are gathered.
READ_CHUNK = 500
# How long a gatherer trusts notifications alone before it reads the batch again: one from
# another replica may not cross, and a slow reader's queue drops the oldest.
RECHECK_S = 1.0
# How much longer an item's JSON may be, measured, than its text in the body: `\u0001` for
# a control character, `1000000000000000.0` for `1e15`.
_EXPANSION = 8
_RESCAN_S = 5.0

_BY_KEY = select(_B).where(
    _B.c.tenant_id == bindparam("_tenant"), _B.c.idempotency_key == bindparam("_key")
)
_BY_ID = select(_B).where(_B.c.tenant_id == bindparam("_tenant"), _B.c.id == bindparam("_id"))
_EXECUTIONS_BY_KEYS = select(_E.c.id, _E.c.idempotency_key).where(
    _E.c.tenant_id == bindparam("_tenant"),
    _E.c.idempotency_key.in_(bindparam("_keys", expanding=True)),
)
# Of an item's execution, what its result shows (`result_view`).
_RESULT = [_E.c[name] for name in RESULT_COLUMNS]
_EXECUTIONS_BY_IDS = select(*_RESULT).where(_E.c.id.in_(bindparam("_ids", expanding=True)))
_ENDED_OF_BATCH = select(*_RESULT).where(
    _E.c.batch_id == bindparam("_batch"),
    _E.c.batch_index.in_(bindparam("_indexes", expanding=True)),
    _E.c.state.in_(_TERMINAL),
)
_STATES_BY_IDS = select(_E.c.id, _E.c.state).where(_E.c.id.in_(bindparam("_ids", expanding=True)))
_INSERT_EXECUTIONS = _E.insert()
_INSERT_BATCH = _B.insert()
# Reused executions a results socket subscribes to (`BatchService._topics`).
_REUSED_HEARD = 64


class MapRequest(BaseModel):
    """`POST /v1/functions/{name}/map`. Items are checked one by one (`BatchService.submit`),
    so they arrive here as any JSON."""

    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(min_length=1)
    idempotency_key: IdempotencyKey | None = None
    # The placement strategy of items that name none.
    strategy: PresetStrategy | None = None


@dataclass(frozen=True, slots=True)
class Created:
    """A batch as submitted: its row, the executions it made (to place), and whether this
    request made it (False: its idempotency key named one made before)."""

    batch: Any
    executions: list[Any]
    function: FunctionRecord
    created: bool


def item_error(exc: TreadleError) -> dict[str, Any]:
    """What an item refused for `exc` says, as the error body of a single invoke would."""
    return {"code": exc.code, "message": _text(exc.message), "details": exc.details}


# What a refusal keeps of an item's errors: it is stored with the batch and sent with every
# read of it, so an item with a million bad fields must not make it a million entries long.
_ERRORS_KEPT = 5
_LOC_KEPT = 12
_TEXT_KEPT = 512


def _text(value: Any) -> Any:
    """A string as it can be stored and sent: cut short, and a lone surrogate (which JSON
    parsing lets through, and UTF-8 cannot carry) written out as its escape."""
    if not isinstance(value, str):
        return value
    return value[:_TEXT_KEPT].encode("utf-8", "backslashreplace").decode("utf-8")


def _validation(exc: ValidationError, index: int) -> dict[str, Any]:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    details = [
        {
            "loc": ["body", "items", index, *(_text(p) for p in err.get("loc", ())[:_LOC_KEPT])],
            "msg": _text(err.get("msg", "")),
            "type": _text(err.get("type", "")),
        }
        for err in errors[:_ERRORS_KEPT]
    ]
    first = details[0]
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}"
    if len(errors) > _ERRORS_KEPT:
        message += f" (and {len(errors) - 1} more errors; the first {_ERRORS_KEPT} are listed)"
    return {"code": "validation_error", "message": message, "details": details}


def _unreadable(exc: ValueError, index: int) -> dict[str, Any]:
    message = f"body.items.{index}: {_text(str(exc))}"
    return {"code": "validation_error", "message": message, "details": None}


class BatchService:
    def __init__(
        self,
        db: Database,
        writer: Writer,
        bus: EventBus,
        functions: FunctionService,
        executions: ExecutionService,
        settings: WeaverSettings,
    ) -> None:
        self._db = db
        self._writer = writer
        self._bus = bus
        self._functions = functions
        self._executions = executions
        self._settings = settings
        # How many of a batch the tenant's quotas admit, stored within
        # (`QuotaService.admissible`).
        self.admissible: Callable[..., contextlib.AbstractAsyncContextManager[Admitted]] | None = (
            None
        )

    # submitting

    async def submit(
        self,
        tenant_id: str,
        name: str,
        body: MapRequest,
        version: int | None = None,
        body_bytes: int | None = None,
    ) -> Created:
        """Check each item, and store the batch with an execution for each that passed.
        `body_bytes`, the request's size when known: an item cannot be larger."""
        limit = self._settings.max_batch_items
        if len(body.items) > limit:
            raise PayloadTooLarge(
                f"the batch has {len(body.items)} items; the limit is {limit}",
                details=[{"loc": ["body", "items"], "limit": limit}],
            )
        key = body.idempotency_key
        if key is not None and (earlier := await self._by_key(tenant_id, key)) is not None:
            # A retry: the batch first made, whatever has happened to its function since.
            self._same_function(earlier, name, key)
            function = await self._functions.get(
                tenant_id, name, earlier.version, include_deleted=True
            )
            return Created(earlier, [], function, created=False)
        function = await self._functions.get(tenant_id, name, version)
        refused: dict[int, dict[str, Any]] = {}
        valid: list[tuple[int, InvokeRequest]] = []
        settings = self._settings
        # An item, measured as check_limits measures it (JSON, escaped), is at most
        # _EXPANSION times its share of the body: under that, none needs measuring one by one.
        small = body_bytes is not None and body_bytes * _EXPANSION <= min(
            settings.max_args_bytes, settings.max_stdin_bytes
        )
        command = function.spec.command
        # Most commands take no placeholders: then no item needs checking for them.
        needs_args = bool(placeholders(command))
        for index, raw in enumerate(body.items):
            try:
                item = InvokeRequest.model_validate(raw)
                if not small:
                    self._executions.check_limits(item)
                if needs_args:
                    check_placeholders(command, item.args)
            except ValidationError as exc:
                refused[index] = _validation(exc, index)
                continue
            except TreadleError as exc:
                refused[index] = item_error(exc)
                continue
            except ValueError as exc:  # e.g. a string UTF-8 cannot carry
                refused[index] = _unreadable(exc, index)
                continue
            valid.append((index, item))
        admission = (
            self.admissible(tenant_id, function.spec.resources, len(valid))
            if self.admissible is not None and valid
            else contextlib.nullcontext((len(valid), None))
        )
        async with admission as (admitted, refusal):
            if refusal is not None:
                for index, _item in valid[admitted:]:
                    refused[index] = item_error(refusal)
                valid = valid[:admitted]
            write = self._write(tenant_id, function, body, valid, refused)
            try:
                batch, made, created = await self._writer.decided(write)
            except IntegrityError:
                # Another replica stored one of these keys (the batch's, an item's) meanwhile:
                # run again, the write finds it and answers with it.
                batch, made, created = await self._writer.decided(write)
        if not created:
            self._same_function(batch, name, key)
        return Created(batch, made, function, created)

    @staticmethod
    def _same_function(batch: Any, name: str, key: str | None) -> None:
        if batch.function != name:
            raise Conflict(
                f"the idempotency key {key!r} names a batch of function {batch.function!r}",
                details={"idempotency_key": key, "batch": batch.id},
            )

    def _write(
        self,
        tenant_id: str,
        function: FunctionRecord,
        body: MapRequest,
        valid: list[tuple[int, InvokeRequest]],
        refused: dict[int, dict[str, Any]],
    ) -> Any:
        spec = function.spec
        key = body.idempotency_key

        async def write(tx: Tx) -> tuple[Any, list[Any], bool]:
            if key is not None:
                by_key = {"_tenant": tenant_id, "_key": key}
                earlier = (await tx.conn.execute(_BY_KEY, by_key)).first()
                if earlier is not None:
                    return earlier, [], False
            batch_id = new_id(BATCH)
            # Items whose key an execution already holds are answered by it; two items of
            # this batch with one key share the execution the first one makes.
            keys = sorted({item.idempotency_key for _, item in valid if item.idempotency_key})
            held: dict[str, str] = {}
            for at in range(0, len(keys), READ_CHUNK):
                params: dict[str, Any] = {"_tenant": tenant_id, "_keys": keys[at : at + READ_CHUNK]}
                for row in await tx.conn.execute(_EXECUTIONS_BY_KEYS, params):
                    held[row.idempotency_key] = row.id
            reused: dict[str, str] = {}
            rows: list[dict[str, Any]] = []
            for index, item in valid:
                item_key = item.idempotency_key
                if item_key is not None and item_key in held:
                    reused[str(index)] = held[item_key]
                    continue
                values = fresh_execution(
                    function,
                    tenant_id,
                    tx.now,
                    item,
                    strategy=body.strategy,
                    batch=(batch_id, index),
                )
                if item_key is not None:
                    held[item_key] = values["id"]
                rows.append(values)
            batch = {
                "id": batch_id,
                "tenant_id": tenant_id,
                "function": spec.name,
                "version": function.version,
                "size": len(body.items),
                "idempotency_key": key,
                "refused": {str(index): error for index, error in sorted(refused.items())},
                "reused": reused,
                "created_at": tx.now,
            }
            await tx.conn.execute(_INSERT_BATCH, batch)
            if rows:
                await tx.insert_many(_INSERT_EXECUTIONS, rows)
                announce_open(tx)
            # One event for the batch, not one per execution: its executions name it.
            tx.emit(
                "batch.open",
                batch_id,
                tenant_id,
                {"function": spec.name, "size": len(body.items), "executions": len(rows)},
            )
            made = [new_row(row) for row in rows]
            return SimpleNamespace(**batch), made, True

        return write

    async def _by_key(self, tenant_id: str, key: str) -> Any:
        async with self._db.read() as conn:
            return (await conn.execute(_BY_KEY, {"_tenant": tenant_id, "_key": key})).first()

    # reading

    async def get(self, tenant_id: str, batch_id: str) -> Any:
        async with self._db.read() as conn:
            row = (await conn.execute(_BY_ID, {"_tenant": tenant_id, "_id": batch_id})).first()
        if row is None:
            raise NotFound(f"batch {batch_id!r} not found", details={"id": batch_id})
        return row

    async def items(self, batch: Any, start: int, stop: int) -> list[dict[str, Any]]:
        """The items of `batch` with indexes in [start, stop), in order, as the API shows
        them."""
        stop = min(stop, batch.size)
        query = (
            select(*_RESULT)
            .where(_E.c.batch_id == batch.id, _E.c.batch_index >= start, _E.c.batch_index < stop)
            .order_by(_E.c.batch_index)
        )
        reused = {
            int(index): execution_id
            for index, execution_id in batch.reused.items()
            if start <= int(index) < stop
        }
        async with self._db.read() as conn:
            made = {row.batch_index: row for row in await conn.execute(query)}
            others = await self._read_ids(conn, set(reused.values()))
        items = []
        for index in range(start, stop):
            row = made.get(index)
            if row is None and index in reused:
                row = others.get(reused[index])
            items.append(self._item(batch, index, row))
        return items

    async def counts(self, batch: Any) -> dict[str, int]:
        """How many of the batch's items are in each state (`refused` for those refused)."""
        query = (
            select(_E.c.state, func.count()).where(_E.c.batch_id == batch.id).group_by(_E.c.state)
        )
        async with self._db.read() as conn:
            grouped: Any = await conn.execute(query)
            counted = {str(state): int(n) for state, n in grouped}
            states: dict[str, str] = {}
            reused = sorted(set(batch.reused.values()))
            for at in range(0, len(reused), READ_CHUNK):
                chunk = reused[at : at + READ_CHUNK]
                for row in await conn.execute(_STATES_BY_IDS, {"_ids": chunk}):
                    states[row.id] = row.state
        for execution_id in batch.reused.values():
            state = states.get(execution_id)
            if state is not None:
                counted[state] = counted.get(state, 0) + 1
        if batch.refused:
            counted["refused"] = len(batch.refused)
        return counted

    @staticmethod
    def finished(counts: dict[str, int], batch: Any) -> bool:
        ended = sum(n for state, n in counts.items() if state == "refused" or state in _TERMINAL)
        return bool(ended >= batch.size)

    def _item(self, batch: Any, index: int, row: Any) -> dict[str, Any]:
        error = batch.refused.get(str(index))
        if error is not None:
            return {"index": index, "execution": None, "error": error}
        if row is None:  # only if the execution it names was deleted
            missing = NotFound("the item's execution is gone", details={"index": index})
            return {"index": index, "execution": None, "error": item_error(missing)}
        item = {"index": index, "execution": result_view(row), "error": None}
        if str(index) in batch.reused:
            item["reused"] = True
        return item

    @staticmethod
    async def _read_ids(conn: Any, ids: Iterable[str]) -> dict[str, Any]:
        wanted = sorted(ids)
        found: dict[str, Any] = {}
        for at in range(0, len(wanted), READ_CHUNK):
            chunk = wanted[at : at + READ_CHUNK]
            for row in await conn.execute(_EXECUTIONS_BY_IDS, {"_ids": chunk}):
                found[row.id] = row
        return found

    # waiting and gathering

    async def wait_for(
        self, tenant_id: str, batch: Any, start: int, stop: int, within: float
    ) -> list[dict[str, Any]]:
        """The items in [start, stop) once all have ended, or as they are when `within`
        seconds pass."""
        deadline = time.monotonic() + within
        subscription = self._bus.subscribe(self._topics(batch), max_queued=0)
        try:
            while True:
                items = await self.items(batch, start, stop)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or all(_ended(item) for item in items):
                    return items
                await subscription.get(within=min(remaining, RECHECK_S))
                subscription.drain()
        finally:
            subscription.close()

    async def results(self, batch: Any) -> AsyncIterator[list[dict[str, Any]]]:
        """Every item of `batch` once it has ended, in the order they end (those refused and
        those already ended first), each once: in groups, of those found ended together."""
        subscription = self._bus.subscribe(self._topics(batch), max_queued=0)
        try:
            left = set(range(batch.size))
            refused = sorted(int(i) for i in batch.refused)
            if refused:
                left.difference_update(refused)
                for at in range(0, len(refused), READ_CHUNK):
                    yield [
                        self._item(batch, index, None) for index in refused[at : at + READ_CHUNK]
                    ]
            answers = _Answers(batch)
            rows = await self._ended_rows(batch, answers, left)
            checked = time.monotonic()
            while True:
                ended = []
                for row in sorted(rows, key=lambda r: (r.ended_at or 0.0, r.id)):
                    if not is_terminal(ExecutionState(row.state)):
                        continue
                    for index in answers.of(row):
                        if index in left:
                            left.discard(index)
                            ended.append(self._item(batch, index, row))
                for at in range(0, len(ended), READ_CHUNK):
                    yield ended[at : at + READ_CHUNK]  # messages of a bounded size
                if not left:
                    return
                event = await subscription.get(within=RECHECK_S)
                ids: set[str] = set()
                # Those already queued too (`get(within=0)` only takes what is there).
                while event is not None:
                    ids.add(str(event.data.get("id") or event.subject_id))
                    if len(ids) >= READ_CHUNK:
                        break
                    event = await subscription.get(within=0)
                if not ids or time.monotonic() - checked > _RESCAN_S:
                    # Quiet for RECHECK_S, or long busy: read what ended, in case a notice
                    # (another replica's) never came.
                    checked = time.monotonic()
                    rows = await self._ended_rows(batch, answers, left)
                else:
                    async with self._db.read() as conn:
                        rows = list((await self._read_ids(conn, ids)).values())
        finally:
            subscription.close()

    async def _ended_rows(self, batch: Any, answers: _Answers, left: set[int]) -> list[Any]:
        """The ended executions that answer items in `left`."""
        if not left:
            return []
        # Only the items still left, a chunk at a time by index: what ended before was sent,
        # and a batch of finished items with large results is not read again every second.
        wanted = sorted(left)
        rows: list[Any] = []
        async with self._db.read() as conn:
            for at in range(0, len(wanted), READ_CHUNK):
                params = {"_batch": batch.id, "_indexes": wanted[at : at + READ_CHUNK]}
                rows += list(await conn.execute(_ENDED_OF_BATCH, params))
            others = await self._read_ids(conn, answers.reused_for(left))
        return rows + list(others.values())

    @staticmethod
    def _topics(batch: Any) -> list[str]:
        # The first few reused executions are heard at once; the rest, by the periodic
        # read of what ended (a batch reusing 10,000 would hold 10,000 subscriptions).
        reused = dict.fromkeys(batch.reused.values())
        return [
            f"batch.{batch.id}",
            *(f"execution.{i}" for i in itertools.islice(reused, _REUSED_HEARD)),
        ]


def _ended(item: dict[str, Any]) -> bool:
    execution = item["execution"]
    return execution is None or is_terminal(ExecutionState(execution["state"]))


class _Answers:
    """Which items of a batch an execution answers: the one it was made for, and those
    reusing it (an earlier execution with their key, or one of this batch's)."""

    def __init__(self, batch: Any) -> None:
        self._batch_id = batch.id
        self._reused: dict[str, list[int]] = {}
        for index, execution_id in batch.reused.items():
            self._reused.setdefault(execution_id, []).append(int(index))

    def of(self, row: Any) -> list[int]:
        own = [int(row.batch_index)] if row.batch_id == self._batch_id else []
        return own + self._reused.get(row.id, [])

    def reused_for(self, left: set[int]) -> list[str]:
        return [i for i, indexes in self._reused.items() if any(n in left for n in indexes)]
