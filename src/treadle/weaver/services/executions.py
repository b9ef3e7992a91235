"""Executions as users see them: invoke, read, list, cancel, output, wait."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from sqlalchemy import and_, func, select

from treadle.domain.errors import InvalidTransition, NotFound, PayloadTooLarge
from treadle.domain.execution import Event, ExecutionState, is_terminal
from treadle.domain.function import PresetStrategy, ensure_json_safe, render_command
from treadle.domain.quotas import BUDGET_EXCEEDED
from treadle.protocol.limits import JsonObject
from treadle.weaver.events.bus import EventBus
from treadle.weaver.ids import EXECUTION, new_id
from treadle.weaver.services.cursors import (
    SCAN_WINDOW,
    ScanWindow,
    decode_cursor,
    encode_cursor,
)
from treadle.weaver.services.fleet import announce_open, order_cancel
from treadle.weaver.services.functions import FunctionRecord, FunctionService
from treadle.weaver.services.transitions import load_execution, transition
from treadle.weaver.settings import WeaverSettings
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.finals import Finals
from treadle.weaver.store.statements import (
    EXECUTION_BY_IDEMPOTENCY_KEY,
    EXECUTION_BY_TENANT_AND_ID,
)
from treadle.weaver.store.writer import Tx, Writer
from treadle.weaver.views import execution_view

# What checks a tenant's quotas and budget before new work is stored.
# The tenant's quotas (`QuotaService.admit`): refuses, or admits work stored within.
Admission = Callable[..., contextlib.AbstractAsyncContextManager[None]]

__all__ = [
    "ExecutionService",
    "IdempotencyKey",
    "InvokeRequest",
    "Invoked",
    "output_complete",
]

_E = tables.executions
_O = tables.output_chunks


_INSERT = _E.insert()
_RECHECK_S = 1.0
# Chunks read at a time while output is sent (each at most a frame's worth of text).
OUTPUT_BATCH = 256
# What a fresh row holds besides the values invoke writes.
_UNSET = {c.name: None for c in _E.columns}


def new_row(values: dict[str, Any]) -> Any:
    """A fresh execution as a stored row would read, from the values inserted."""
    return SimpleNamespace(**{**_UNSET, **values})


def fresh_execution(
    function: FunctionRecord,
    tenant_id: str,
    now: float,
    request: InvokeRequest,
    *,
    strategy: str | None = None,
    batch: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The row of a new execution of `function` for `request` (an invoke, or a batch's item,
    whose batch's `strategy` applies where the item names none)."""
    spec = function.spec
    strategy = request.strategy or strategy
    values: dict[str, Any] = {
        "id": new_id(EXECUTION),
        "tenant_id": tenant_id,
        "function": spec.name,
        "version": function.version,
        "state": ExecutionState.OPEN.value,
        "attempt": 1,
        "max_attempts": spec.max_attempts,
        "args": request.args,
        "stdin": request.stdin,
        "idempotency_key": request.idempotency_key,
        "cancel_requested": False,
        "resources": function.resources_json,
        "isolation": spec.isolation.value if spec.isolation else None,
        # Until it is placed, what the invoke asked of placement; then the decision.
        "placement": {"requested_strategy": strategy} if strategy else None,
        "created_at": now,
        "queued_at": now,
    }
    if batch is not None:
        values["batch_id"], values["batch_index"] = batch
    return values


def _text_key(value: str) -> str:
    # PostgreSQL's text cannot hold NUL: refused here, not failed at the insert.
    if "\x00" in value:
        raise ValueError("the idempotency key cannot contain NUL characters")
    return value


# What an invoke, a batch and each of its items may be named by, to make a retry return the
# execution (or batch) the first try made.
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_text_key)]


class InvokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    args: JsonObject = Field(default_factory=dict)
    stdin: str | None = None
    idempotency_key: IdempotencyKey | None = None
    # Overrides the function's placement strategy for this execution (not `custom`, whose
    # weights belong to the function).
    strategy: PresetStrategy | None = None

    @model_validator(mode="after")
    def _json_safe(self) -> InvokeRequest:
        ensure_json_safe([self.stdin, self.idempotency_key])  # args: by their type
        return self

    @field_validator("stdin")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("stdin is text and cannot contain NUL characters")
        return value


@dataclass(frozen=True, slots=True)
class Invoked:
    row: Any
    function: FunctionRecord
    created: bool
    # Placed in the transaction that stored it (`PlaceNew`): not for the dispatcher's queue.
    placed: bool = False


# Places a new execution in the transaction that stores it (the dispatcher's `place_new`):
# given its row's values, which it may complete with a node; what undoes it, or None.
PlaceNew = Callable[[Tx, dict[str, Any], FunctionRecord], Awaitable[Any]]


class ExecutionService:
    def __init__(
        self,
        db: Database,
        writer: Writer,
        bus: EventBus,
        functions: FunctionService,
        settings: WeaverSettings,
        on_cancel: Callable[[Any], None],
        finals: Finals,
    ) -> None:
        self._db = db
        self._writer = writer
        self._bus = bus
        # Rows of ended executions the writer read for this replica's waiters.
        self._finals = finals
        self._functions = functions
        self._settings = settings
        self._on_cancel = on_cancel
        # The tenant's quotas and budget, checked before new work is stored (`quotas`).
        self.admit: Admission | None = None

    def check_limits(self, body: InvokeRequest) -> None:
        args_size = len(json.dumps(body.args, separators=(",", ":")))
        if args_size > self._settings.max_args_bytes:
            raise PayloadTooLarge(
                f"args are {args_size} bytes; the limit is {self._settings.max_args_bytes}",
                details=[{"loc": ["body", "args"], "limit": self._settings.max_args_bytes}],
            )
        if body.stdin is not None and len(body.stdin) > self._settings.max_stdin_bytes:
            raise PayloadTooLarge(
                f"stdin is over the limit of {self._settings.max_stdin_bytes} bytes",
                details=[{"loc": ["body", "stdin"], "limit": self._settings.max_stdin_bytes}],
            )

    async def invoke(
        self,
        tenant_id: str,
        name: str,
        body: InvokeRequest,
        version: int | None = None,
        place: PlaceNew | None = None,
    ) -> Invoked:
        self.check_limits(body)
        function = await self._functions.get(tenant_id, name, version)
        spec = function.spec
        render_command(spec.command, body.args)  # a missing placeholder is a 422 now, not later
        key = body.idempotency_key

        async def by_key(tx: Tx) -> Any:
            params = {"_tenant": tenant_id, "_key": key}
            return (await tx.conn.execute(EXECUTION_BY_IDEMPOTENCY_KEY, params)).first()

        async def write(tx: Tx) -> tuple[Any, bool, bool]:
            values = fresh_execution(function, tenant_id, tx.now, body)
            execution_id = values["id"]
            placed = await place(tx, values, function) if place is not None else None
            if key is None:
                await tx.insert_later(_INSERT, values)
            else:
                # A key seen before, or one another replica is inserting right now: the
                # insert stores nothing, and the execution that holds the key is returned.
                # Inserting first costs a new key one statement, not two. RETURNING, not
                # rowcount, tells whether this statement stored the row: with psycopg the
                # rowcount of a skipped row was seen to read 1.
                statement = tx.db.insert_ignoring_conflicts(_E, returning=_E.c.id)
                if (await tx.conn.execute(statement, values)).first() is None:
                    if placed is not None:
                        placed.undo()  # the key's execution is placed already
                    if (existing := await by_key(tx)) is not None:
                        return existing, False, False
                    raise InvalidTransition(
                        "the execution with this idempotency key could not be read; try again",
                        details={"idempotency_key": key},
                    )
            tx.emit(
                "execution.open",
                execution_id,
                tenant_id,
                {"state": "open", "attempt": 1, "function": spec.name},
            )
            if placed is None:
                announce_open(tx)
            return new_row(values), True, placed is not None

        admitted = (
            self.admit(tenant_id, spec.resources, sandbox=False)
            if self.admit is not None
            else contextlib.nullcontext()
        )
        async with admitted:
            row, created, placed = await self._writer.decided(write)
        return Invoked(row=row, function=function, created=created, placed=placed)

    async def get(self, tenant_id: str, execution_id: str) -> Any:
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    EXECUTION_BY_TENANT_AND_ID, {"_id": execution_id, "_tenant": tenant_id}
                )
            ).first()
        if row is None:
            raise NotFound(f"execution {execution_id!r} not found", details={"id": execution_id})
        return row

    async def page(
        self,
        tenant_id: str,
        *,
        state: ExecutionState | None = None,
        function: str | None = None,
        node_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        bounds = [_E.c.tenant_id == tenant_id]
        if cursor is not None:
            bounds.append(_E.c.id < decode_cursor(cursor, EXECUTION))
        window = ScanWindow(_E, bounds, SCAN_WINDOW)
        given = {"state": getattr(state, "value", None), "function": function, "node_id": node_id}
        wanted = {column: value for column, value in given.items() if value is not None}
        if wanted:
            rows_of = window.rows.c
            query = select(window.rows).where(*(rows_of[k] == v for k, v in wanted.items()))
        else:
            rows_of = _E.c
            query = select(_E).where(*bounds)
        query = query.order_by(rows_of.id.desc()).limit(limit + 1)
        async with self._db.read() as conn:
            rows = list(await conn.execute(query))
            next_cursor: str | None = None
            if len(rows) > limit:
                next_cursor = encode_cursor(rows[limit - 1].id)
            elif wanted:
                next_cursor = await window.cursor_after(conn)
        return [execution_view(row) for row in rows[:limit]], next_cursor

    async def over_budget(self, tenant_id: str) -> None:
        """The tenant's hard budget is spent: cancel its open and running executions."""
        async with self._db.read() as conn:
            ids = (
                (
                    await conn.execute(
                        select(tables.executions.c.id).where(
                            tables.executions.c.tenant_id == tenant_id,
                            tables.executions.c.state.in_(("open", "running")),
                        )
                    )
                )
                .scalars()
                .all()
            )
        for execution_id in ids:
            with contextlib.suppress(InvalidTransition, NotFound):
                await self.cancel(tenant_id, execution_id, reason=BUDGET_EXCEEDED)

    async def cancel(self, tenant_id: str, execution_id: str, reason: str = "cancelled") -> Any:
        async def write(tx: Tx) -> tuple[Any, Any]:
            while True:
                row = await load_execution(tx, execution_id, tenant_id)
                if is_terminal(ExecutionState(row.state)):
                    raise InvalidTransition(
                        f"execution {execution_id} already ended ({row.state})",
                        details={"id": execution_id, "state": row.state},
                    )
                if await transition(tx, row, Event.CANCEL, error=reason, cancel_requested=True):
                    if row.node_id:
                        order_cancel(tx, row.node_id, row.id, row.attempt, reason)
                    return row, await load_execution(tx, execution_id)

        before, after = await self._writer.run(write)
        self._on_cancel(before)
        return after

    async def wait(self, tenant_id: str, execution_id: str, within: float, row: Any = None) -> Any:
        """The execution once terminal, or as it is when `within` seconds pass. `row`, when
        given, is the execution as the caller last saw it, before it subscribed."""
        deadline = time.monotonic() + within
        finals = self._finals
        subscription = self._bus.subscribe([f"execution.{execution_id}"])
        finals.watch(execution_id)
        try:
            if row is None:
                row = await self.get(tenant_id, execution_id)
            while not is_terminal(ExecutionState(row.state)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Events only say "look again"; one from another replica that never crossed
                # must not leave the caller waiting until the deadline.
                event = await subscription.get(within=min(remaining, _RECHECK_S))
                if event is None or is_terminal(ExecutionState(event.data["state"])):
                    kept = finals.take(execution_id, tenant_id)
                    row = kept if kept is not None else await self.get(tenant_id, execution_id)
            return row
        finally:
            finals.unwatch(execution_id)
            subscription.close()

    async def output(self, row: Any, after_seq: int | None = None) -> AsyncIterator[bytes]:
        """The output of `row`'s attempt (chunks after `after_seq`) as the JSON document
        `{"stdout", "stderr", "attempt", "complete", "next_seq"}`, made piece by piece as it
        is sent, a batch of chunks at a time, so that large output is never held whole.

        What it covers is fixed first: the chunks stored up to now, `next_seq` past the last
        of them, so a later request with `after_seq=next_seq - 1` misses none."""
        of_attempt = and_(_O.c.execution_id == row.id, _O.c.attempt == row.attempt)
        async with self._db.read() as conn:
            counted: Any = (
                await conn.execute(select(func.count(), func.max(_O.c.seq)).where(of_attempt))
            ).one()
        stored: int = counted[0]
        top: int | None = counted[1]
        floor = -1 if after_seq is None else after_seq
        if top is not None and top > floor:
            next_seq = top + 1
        else:
            top, next_seq = floor, floor + 1
        tail = {
            "attempt": row.attempt,
            "complete": output_complete(row, stored),
            "next_seq": next_seq,
        }
        return self._output_document(row, floor, top, tail)

    async def _output_document(
        self, row: Any, floor: int, top: int, tail: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        for opening, stream in (('{"stdout":"', "stdout"), ('","stderr":"', "stderr")):
            yield opening.encode()
            after = floor
            while after < top:
                query = (
                    select(_O.c.seq, _O.c.data)
                    .where(
                        _O.c.execution_id == row.id,
                        _O.c.attempt == row.attempt,
                        _O.c.stream == stream,
                        _O.c.seq > after,
                        _O.c.seq <= top,
                    )
                    .order_by(_O.c.seq)
                    .limit(OUTPUT_BATCH)
                )
                async with self._db.read() as conn:
                    chunks = list(await conn.execute(query))
                if chunks:
                    # Escaping batch by batch gives what escaping the whole text would.
                    text = "".join(chunk.data for chunk in chunks)
                    yield _json_string_body(text)
                if len(chunks) < OUTPUT_BATCH:
                    break
                after = chunks[-1].seq
        rest = json.dumps(tail, separators=(",", ":"))
        yield ('",' + rest[1:]).encode()

    async def chunks_after(self, row: Any, after_seq: int, limit: int | None = None) -> list[Any]:
        query = (
            select(_O.c.stream, _O.c.seq, _O.c.data)
            .where(
                _O.c.execution_id == row.id,
                _O.c.attempt == row.attempt,
                _O.c.seq > after_seq,
            )
            .order_by(_O.c.seq)
        )
        if limit is not None:
            query = query.limit(limit)
        async with self._db.read() as conn:
            return list(await conn.execute(query))

    async def open_unassigned(self, exclude: set[str], limit: int = 1000) -> list[Any]:
        """Open executions on no node, oldest first, except `exclude`. Only ids are read for
        the excluded ones: rows carry args and stdin, which may be megabytes each."""
        ids_query = (
            select(_E.c.id)
            .where(_E.c.state == ExecutionState.OPEN.value, _E.c.node_id.is_(None))
            .order_by(_E.c.id)
            .limit(limit + len(exclude))
        )
        async with self._db.read() as conn:
            ids = [i for i in (await conn.execute(ids_query)).scalars() if i not in exclude]
            if not ids:
                return []
            rows = await conn.execute(select(_E).where(_E.c.id.in_(ids[:limit])).order_by(_E.c.id))
            return list(rows)

    async def unschedulable(self, older_than: float, limit: int = 100) -> list[str]:
        """Open executions on no node that have waited since before `older_than`."""
        query = (
            select(_E.c.id)
            .where(
                _E.c.state == ExecutionState.OPEN.value,
                _E.c.node_id.is_(None),
                _E.c.queued_at < older_than,
            )
            .limit(limit)
        )
        async with self._db.read() as conn:
            return list((await conn.execute(query)).scalars())

    async def give_up(self, execution_ids: list[str], reason: str) -> list[str]:
        """End open, unplaced executions in failure with `reason`; the ids that ended."""

        async def write(tx: Tx) -> list[str]:
            ended = []
            for execution_id in execution_ids:
                row = await load_execution(tx, execution_id)
                unplaced = row.state == ExecutionState.OPEN.value and row.node_id is None
                if unplaced and await transition(tx, row, Event.GIVE_UP, error=reason):
                    ended.append(execution_id)
            return ended

        return await self._writer.run(write)


def output_complete(row: Any, stored: int) -> bool:
    """All output is stored once the execution ended and its node reported how many chunks it
    made; an execution that never ran has none to wait for. Of output cut at the cap, the
    chunks past the cap are never stored: the exit report is what completes it."""
    if not is_terminal(ExecutionState(row.state)):
        return False
    if row.output_chunks is not None:
        return bool(row.output_truncated) or bool(stored >= row.output_chunks)
    return row.running_at is None


def _json_string_body(text: str) -> bytes:
    """`text` as the inside of a JSON string, encoded as a JSON response is."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "replace")
