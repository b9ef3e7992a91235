"""Sandboxes as users and nodes see them: create, read, list, desire a status, refresh the
TTL; placement; and what nodes report.

The store holds each sandbox's desired status (what the API asked) and its observed status
(`treadle.domain.sandbox`, moved only by `apply`), its node and incarnation. Every change is
a compare-and-swap on (status, desired, incarnation) with an event. Nodes report by
incarnation, and a report for another incarnation than the current one is fenced off: a node
still running an old one is told to stop it.

The reconciler's passes (`place`, `steer`, `expire`) bring observed toward desired: they
place pending sandboxes through the same pure scheduler and tier rule as executions, send
pause/resume/stop to the nodes whose links are on this replica, and apply TTLs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from sqlalchemy import and_, func, select, update

from treadle.domain.errors import InvalidRequest, InvalidTransition, LimitExceeded, NotFound
from treadle.domain.quotas import BUDGET_EXCEEDED
from treadle.domain.resources import Resources, Tier
from treadle.domain.sandbox import (
    DEFAULT_HOME,
    ON_NODE_STATUSES,
    PAUSABLE_TIERS,
    STARTING_STATUSES,
    TERMINAL_STATUSES,
    Desired,
    End,
    ExpiryAction,
    SandboxEvent,
    SandboxSpec,
    SandboxStatus,
    Step,
    after_end,
    apply,
    check_takes_work,
    desire,
    next_step,
)
from treadle.protocol import (
    SandboxActivity,
    SandboxControl,
    SandboxStart,
    SandboxState,
    WeaverMessage,
    WorkloadRef,
)
from treadle.protocol import SandboxSpec as NodeSandboxSpec
from treadle.scheduler import Fleet, Placement, place, tiers
from treadle.weaver.events.bus import EventBus
from treadle.weaver.ids import SANDBOX, new_id
from treadle.weaver.services.auth import process_tier_tenants
from treadle.weaver.services.cursors import (
    SCAN_WINDOW,
    ScanWindow,
    decode_cursor,
    encode_cursor,
)
from treadle.weaver.services.dispatcher import request_for, strategy_of
from treadle.weaver.services.nodes import NodeRegistry, NodeSession
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.writer import Tx, Writer
from treadle.weaver.views import iso

__all__ = ["SandboxService", "sandbox_view"]

log = logging.getLogger(__name__)
# How long a call that needs a running sandbox waits for one still starting.
START_WAIT_S = 30.0
_S = tables.sandboxes
_ON_NODE = [s.value for s in ON_NODE_STATUSES]
_LIVE = [s.value for s in SandboxStatus if s not in TERMINAL_STATUSES]
_ACTIONS: dict[Step, Literal["stop", "pause", "resume"]] = {
    Step.PAUSE: "pause",
    Step.RESUME: "resume",
    Step.STOP: "stop",
}


def sandbox_view(row: Any) -> dict[str, Any]:
    spec = row.spec
    return {
        "id": row.id,
        "status": row.status,
        "desired": row.desired,
        "incarnation": row.incarnation,
        "node_id": row.node_id,
        "isolation": row.isolation,
        "image": spec.get("image"),
        "resources": spec.get("resources"),
        "network": spec.get("network", False),
        "home": spec.get("home") or DEFAULT_HOME,
        "public_ports": bool(spec.get("public_ports")),
        "sudo": bool(spec.get("sudo")),
        "desktop": spec.get("desktop"),
        "metadata": row.metadata,
        "restart": spec.get("restart"),
        "on_expiry": spec.get("on_expiry"),
        "timeout_s": spec.get("timeout_s"),
        "idle_timeout_s": spec.get("idle_timeout_s"),
        "pending_reason": row.pending_reason,
        "end_reason": row.end_reason,
        "restarts": row.restarts,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "ended_at": iso(row.ended_at),
        "expires_at": iso(row.expires_at),
        "access_token": row.access_token,
        "awake": _awake_view(row),
    }


def _awake_view(row: Any) -> dict[str, Any] | None:
    """Why a running sandbox is awake, as its node last said (None before it said, and
    when the sandbox is not running)."""
    awake = row.awake
    if row.status != SandboxStatus.RUNNING.value or not isinstance(awake, dict):
        return None
    return {
        "idle": not awake.get("reasons"),
        "idle_since": iso(awake.get("idle_since")),
        "reasons": awake.get("reasons", []),
        "idle_timeout_at": iso(row.idle_at),
    }


async def _load(tx: Tx, sandbox_id: str, tenant_id: str | None = None) -> Any:
    query = select(_S).where(_S.c.id == sandbox_id)
    if tenant_id is not None:
        query = query.where(_S.c.tenant_id == tenant_id)
    row = (await tx.conn.execute(query)).first()
    if row is None:
        raise NotFound(f"sandbox {sandbox_id!r} not found", details={"id": sandbox_id})
    return row


async def _swap(tx: Tx, row: Any, **values: Any) -> bool:
    """Compare-and-swap on what `row` was read with: False when another writer got there
    first (the caller reads again)."""
    result = await tx.conn.execute(
        update(_S)
        .where(
            _S.c.id == row.id,
            _S.c.status == row.status,
            _S.c.desired == row.desired,
            _S.c.incarnation == row.incarnation,
        )
        .values(updated_at=tx.now, **values)
    )
    return bool(result.rowcount)


def _spec(row: Any) -> SandboxSpec:
    return SandboxSpec.model_validate(row.spec, context={"stored": True})


# The first part of a window read for a metadata filter; each next one twice the last.
_PART = 200


class SandboxService:
    def __init__(
        self,
        db: Database,
        writer: Writer,
        bus: EventBus,
        registry: NodeRegistry,
        *,
        default_strategy: str,
        default_min_isolation: Tier,
        on_change: Callable[[], None],
        max_per_tenant: int = 100,
    ) -> None:
        self._db = db
        self._writer = writer
        self._bus = bus
        self._registry = registry
        self._default_strategy = default_strategy
        self._default_tier = default_min_isolation
        self._on_change = on_change
        self._max_per_tenant = max_per_tenant
        # The tenant's quotas and budget: refuse, or admit a sandbox stored within (`quotas`).
        self.admit: Callable[..., contextlib.AbstractAsyncContextManager[None]] | None = None
        # Whether the last `place` found sandboxes waiting: only then is freed capacity news.
        self.waiting = True

    # what users do

    async def create(self, tenant_id: str, spec: SandboxSpec) -> Any:
        sandbox_id = new_id(SANDBOX)

        async def write(tx: Tx) -> Any:
            if tiers.names_process(spec) and tenant_id not in await process_tier_tenants(tx.conn):
                raise InvalidRequest(
                    tiers.PROCESS_NOT_ALLOWED,
                    details=[{"loc": ["body", "isolation"], "msg": tiers.PROCESS_NOT_ALLOWED}],
                )
            live = (
                await tx.conn.execute(
                    select(func.count())
                    .select_from(_S)
                    .where(_S.c.tenant_id == tenant_id, _S.c.status.in_(_LIVE))
                )
            ).scalar_one()
            if live >= self._max_per_tenant:
                raise LimitExceeded(
                    f"this tenant has {live} sandboxes that have not ended; the limit is "
                    f"{self._max_per_tenant} (stop some, or ask the operator to raise "
                    "TREADLE_MAX_SANDBOXES_PER_TENANT)",
                    details={"limit": "max_sandboxes_per_tenant", "value": self._max_per_tenant},
                )
            values = {
                "id": sandbox_id,
                "tenant_id": tenant_id,
                "status": SandboxStatus.PENDING.value,
                "desired": Desired.RUNNING.value,
                "incarnation": 1,
                "spec": spec.model_dump(mode="json", exclude={"metadata"}),
                "metadata": spec.metadata,
                "restarts": 0,
                "created_at": tx.now,
                "updated_at": tx.now,
                "expires_at": tx.now + spec.timeout_s,
                "access_token": "sbt_" + secrets.token_urlsafe(24),
            }
            await tx.conn.execute(_S.insert(), values)
            tx.emit("sandbox.pending", sandbox_id, tenant_id, {"status": "pending"})
            return await _load(tx, sandbox_id)

        admitted = (
            self.admit(tenant_id, spec.resources, sandbox=True)
            if self.admit is not None
            else contextlib.nullcontext()
        )
        async with admitted:
            row = await self._writer.decided(write)
        self._on_change()
        return row

    async def get(self, tenant_id: str | None, sandbox_id: str) -> Any:
        """The tenant's sandbox; any tenant's for `None`, which only a caller holding a
        credential of the sandbox's own (its access token) may ask."""
        query = select(_S).where(_S.c.id == sandbox_id)
        if tenant_id is not None:
            query = query.where(_S.c.tenant_id == tenant_id)
        async with self._db.read() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found", details={"id": sandbox_id})
        return row

    async def page(
        self,
        tenant_id: str,
        *,
        statuses: Iterable[SandboxStatus] = (),
        metadata: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        bounds = [_S.c.tenant_id == tenant_id]
        if cursor is not None:
            bounds.append(_S.c.id < decode_cursor(cursor, SANDBOX))
        wanted = [s.value for s in statuses]
        labels = list((metadata or {}).items())
        if not wanted and not labels:
            query = select(_S).where(*bounds).order_by(_S.c.id.desc()).limit(limit + 1)
            async with self._db.read() as conn:
                found = list(await conn.execute(query))
            next_cursor = encode_cursor(found[limit - 1].id) if len(found) > limit else None
            return [sandbox_view(row) for row in found[:limit]], next_cursor
        # Metadata is matched here, not in SQL (JSON queries differ by database): the window
        # is read in parts, each past the last, until enough rows match or it is all read.
        found = []
        next_cursor = None
        read, part = 0, max(limit + 1, _PART)
        async with self._db.read() as conn:
            while True:
                size = min(part, SCAN_WINDOW - read)
                window = ScanWindow(_S, bounds, size)
                query = select(window.rows).order_by(window.rows.c.id.desc())
                if wanted:
                    query = query.where(window.rows.c.status.in_(wanted))
                for row in await conn.execute(query):
                    if all(row.metadata.get(k) == v for k, v in labels):
                        found.append(row)
                if len(found) > limit:
                    next_cursor = encode_cursor(found[limit - 1].id)
                    break
                last = await window.end(conn)
                read += size
                if last is None or read >= SCAN_WINDOW:
                    next_cursor = None if last is None else encode_cursor(last)
                    break
                bounds = [_S.c.tenant_id == tenant_id, _S.c.id < last]
                part *= 2
        return [sandbox_view(row) for row in found[:limit]], next_cursor

    async def over_budget(self, tenant_id: str, action: str) -> None:
        """The tenant's hard budget is spent: stop (or pause, where its tier can) every
        sandbox of its that runs or is to."""
        async with self._db.read() as conn:
            ids = (
                (
                    await conn.execute(
                        select(tables.sandboxes.c.id).where(
                            tables.sandboxes.c.tenant_id == tenant_id,
                            tables.sandboxes.c.desired == Desired.RUNNING.value,
                        )
                    )
                )
                .scalars()
                .all()
            )
        for sandbox_id in ids:
            wanted = Desired.PAUSED if action == "pause" else Desired.STOPPED
            try:
                await self.desire(tenant_id, sandbox_id, wanted, reason=BUDGET_EXCEEDED)
            except InvalidTransition:  # a tier that cannot pause: stopped instead
                await self.desire(tenant_id, sandbox_id, Desired.STOPPED, reason=BUDGET_EXCEEDED)
            except NotFound:
                continue

    async def desire(
        self, tenant_id: str, sandbox_id: str, wanted: Desired, reason: str = "stopped"
    ) -> Any:
        async def write(tx: Tx) -> Any:
            while True:
                row = await _load(tx, sandbox_id, tenant_id)
                status = SandboxStatus(row.status)
                tier = Tier(row.isolation) if row.isolation else None
                desired = desire(Desired(row.desired), wanted, status, tier)
                values: dict[str, Any] = {"desired": desired.value}
                if desired == Desired.STOPPED and row.desired != Desired.STOPPED.value:
                    values["end_reason"] = reason
                if desired == Desired.STOPPED and status == SandboxStatus.PENDING:
                    # Nothing of it is on any node: it is stopped now.
                    values.update(
                        status=apply(status, SandboxEvent.STOP).value,
                        ended_at=tx.now,
                        end_reason=reason,
                    )
                if await _swap(tx, row, **values):
                    tx.emit(
                        f"sandbox.{values.get('status', row.status)}",
                        sandbox_id,
                        tenant_id,
                        {"desired": desired.value, "status": values.get("status", row.status)},
                    )
                    return await _load(tx, sandbox_id)

        row = await self._writer.run(write)
        self._on_change()
        return row

    async def started(self, row: Any, within: float = START_WAIT_S) -> Any:
        """`row` read again once it is past starting, or asked to stop or pause, or after
        `within` seconds: calls that need a running sandbox wait out its start, as E2B's
        create answers only once envd does."""
        deadline = time.monotonic() + within
        while (
            SandboxStatus(row.status) in STARTING_STATUSES
            and row.desired == Desired.RUNNING.value
            and time.monotonic() < deadline
        ):
            await self.changed(row.id, within=min(1.0, max(0.0, deadline - time.monotonic())))
            row = await self.get(row.tenant_id, row.id)
        return row

    async def running(self, row: Any) -> Any:
        """`row` once it has started; InvalidTransition (409) unless it then takes work."""
        row = await self.started(row)
        check_takes_work(row.id, SandboxStatus(row.status), Desired(row.desired))
        return row

    async def changed(self, sandbox_id: str, within: float) -> None:
        """Returns at the sandbox's next event, or after `within` seconds."""
        subscription = self._bus.subscribe([f"sandbox.{sandbox_id}"])
        try:
            await subscription.get(within)
        finally:
            subscription.close()

    async def set_timeout(self, tenant_id: str, sandbox_id: str, timeout_s: float) -> Any:
        """The TTL runs out `timeout_s` from now (E2B's `setTimeout`)."""

        async def write(tx: Tx) -> Any:
            while True:
                row = await _load(tx, sandbox_id, tenant_id)
                if SandboxStatus(row.status) in TERMINAL_STATUSES:
                    raise InvalidTransition(
                        f"sandbox {sandbox_id} already ended ({row.status})",
                        details={"id": sandbox_id, "state": row.status},
                    )
                if await _swap(tx, row, expires_at=tx.now + timeout_s):
                    return await _load(tx, sandbox_id)

        return await self._writer.run(write)

    # what nodes report

    async def reported(
        self, tx: Tx, session: NodeSession, message: SandboxState
    ) -> list[WeaverMessage]:
        row = (await tx.conn.execute(select(_S).where(_S.c.id == message.id))).first()
        current = (
            row is not None
            and row.incarnation == message.incarnation
            and row.node_id == session.node_id
        )
        if not current:
            if message.state in ("running", "paused"):
                # An incarnation Weaver has moved on from: it must not run on.
                return [
                    SandboxControl(id=message.id, incarnation=message.incarnation, action="stop")
                ]
            return []
        assert row is not None
        status = SandboxStatus(row.status)
        if status in TERMINAL_STATUSES:
            return []
        if message.state in ("running", "paused"):
            event = {
                ("running", SandboxStatus.STARTING): SandboxEvent.STARTED,
                ("running", SandboxStatus.PAUSED): SandboxEvent.RESUMED,
                ("running", SandboxStatus.RUNNING): SandboxEvent.STARTED,
                ("paused", SandboxStatus.RUNNING): SandboxEvent.PAUSED,
                ("paused", SandboxStatus.PAUSED): SandboxEvent.PAUSED,
            }.get((message.state, status))
            if event is None:
                return []  # e.g. stopping: the stop is on its way
            values: dict[str, Any] = {"status": apply(status, event).value}
            if event == SandboxEvent.STARTED and row.started_at is None:
                values["started_at"] = tx.now
            if message.reason and message.state == "running" and row.desired == "paused":
                # The node could not pause it: stop asking, and say why.
                values.update(desired=Desired.RUNNING.value, end_reason=message.reason)
            await self._move(tx, row, values)
            return []
        # The incarnation ended on its node.
        session.release((row.id, row.incarnation))
        asked = status == SandboxStatus.STOPPING or row.desired == Desired.STOPPED.value
        if asked:
            # Why it was asked to stop (a client, its TTL) is already on it.
            reason = row.end_reason or message.reason or "stopped"
            await self._end(tx, row, SandboxEvent.STOPPED, reason)
            return []
        end = End.EXITED if message.state == "stopped" else End.CRASHED
        await self._ended_unasked(tx, row, end, message.reason or end.value)
        return []

    async def activity(
        self, tx: Tx, session: NodeSession, message: SandboxActivity
    ) -> list[WeaverMessage]:
        """A running sandbox's node says why it is awake, or since when it is idle."""
        row = (await tx.conn.execute(select(_S).where(_S.c.id == message.id))).first()
        if (
            row is None
            or row.incarnation != message.incarnation
            or row.node_id != session.node_id
            or row.status != SandboxStatus.RUNNING.value
        ):
            return []
        idle_since = None if message.idle_for_s is None else tx.now - message.idle_for_s
        idle_timeout = _spec(row).idle_timeout_s
        await tx.conn.execute(
            update(_S)
            .where(and_(_S.c.id == row.id, _S.c.incarnation == row.incarnation))
            .values(
                awake={"reasons": list(message.reasons), "idle_since": idle_since},
                idle_at=None
                if idle_since is None or idle_timeout is None
                else idle_since + idle_timeout,
            )
        )
        return []

    async def hello(
        self, tx: Tx, session: NodeSession, refs: list[WorkloadRef]
    ) -> list[WeaverMessage]:
        """Reconcile what a node that (re)connects holds with what Weaver expects of it."""
        reported = {ref.id: ref for ref in refs}
        replies: list[WeaverMessage] = []
        expected = await tx.conn.execute(
            select(_S).where(_S.c.node_id == session.node_id, _S.c.status.in_(_ON_NODE))
        )
        for row in list(expected):
            ref = reported.pop(row.id, None)
            if ref is None or ref.generation != row.incarnation:
                if row.status == SandboxStatus.STARTING.value and ref is None:
                    # The start may never have reached it: send it again.
                    replies.append(SandboxStart(spec=_node_spec(row)))
                    session.reserve((row.id, row.incarnation), _resources(row), row.tenant_id)
                    continue
                await self._ended_unasked(tx, row, End.CRASHED, "its node no longer holds it")
                if ref is not None:
                    replies.append(
                        SandboxControl(id=ref.id, incarnation=ref.generation, action="stop")
                    )
                continue
            session.reserve((row.id, row.incarnation), _resources(row), row.tenant_id)
            state = "paused" if ref.state == "paused" else "running"
            replies += await self.reported(
                tx,
                session,
                SandboxState(id=row.id, incarnation=row.incarnation, state=state),
            )
        for ref in reported.values():
            replies.append(SandboxControl(id=ref.id, incarnation=ref.generation, action="stop"))
        return replies

    async def node_lost(self, tx: Tx, node_id: str) -> None:
        """`node_id` is down: what it held ended with it, and restarts by policy."""
        rows = await tx.conn.execute(
            select(_S).where(_S.c.node_id == node_id, _S.c.status.in_(_ON_NODE))
        )
        for row in list(rows):
            if row.status == SandboxStatus.STOPPING.value or row.desired == Desired.STOPPED.value:
                await self._end(tx, row, SandboxEvent.END, "stopped with its node")
            else:
                await self._ended_unasked(tx, row, End.NODE_LOST, "its node was lost")

    async def _ended_unasked(self, tx: Tx, row: Any, end: End, reason: str) -> None:
        spec = _spec(row)
        decision = after_end(spec.restart, end, Desired(row.desired))
        if decision.event == SandboxEvent.RESTART:
            values = {
                "status": apply(SandboxStatus(row.status), SandboxEvent.RESTART).value,
                "incarnation": row.incarnation + 1,
                "node_id": None,
                "restarts": row.restarts + 1,
                "started_at": None,
                "pending_reason": None,
                # What was lost with the incarnation: its processes, memory and files.
                "end_reason": f"restarted: {reason}; its processes, memory and files were lost",
            }
            await self._move(tx, row, values)
            tx.after_commit.append(self._on_change)
            return
        await self._end(tx, row, decision.event, reason)

    async def _end(self, tx: Tx, row: Any, event: SandboxEvent, reason: str) -> None:
        values = {
            "status": apply(SandboxStatus(row.status), event).value,
            "ended_at": tx.now,
            "end_reason": reason,
        }
        await self._move(tx, row, values)

    async def _move(self, tx: Tx, row: Any, values: dict[str, Any]) -> None:
        if values.get("status", SandboxStatus.RUNNING.value) != SandboxStatus.RUNNING.value:
            # Idleness is a running sandbox's: its node says it again after a resume.
            values = {"idle_at": None, "awake": None, **values}
        # Under the writer, reports for one sandbox are applied one at a time; the swap is
        # against the API's concurrent desire changes, which then read again.
        while not await _swap(tx, row, **values):
            row = await _load(tx, row.id)
        if values.get("status") != row.status:
            tx.emit(
                f"sandbox.{values.get('status', row.status)}",
                row.id,
                row.tenant_id,
                {
                    "status": values.get("status", row.status),
                    "incarnation": values.get("incarnation", row.incarnation),
                    "reason": values.get("end_reason"),
                },
            )

    # the reconciler's passes

    async def place(self) -> None:
        """Place pending sandboxes on this replica's nodes."""
        sessions = {s.node_id: s for s in self._registry.sessions()}
        async with self._db.read() as conn:
            pending = list(
                await conn.execute(
                    select(_S)
                    .where(
                        _S.c.status == SandboxStatus.PENDING.value,
                        _S.c.desired != Desired.STOPPED.value,
                    )
                    .order_by(_S.c.id)
                    .limit(256)
                )
            )
            process_tenants = await process_tier_tenants(conn) if pending else frozenset()
        self.waiting = bool(pending)
        if not pending:
            return
        fleet = Fleet(s.view() for s in sessions.values())
        for row in pending:
            spec = _spec(row)
            rule = tiers.rule_for(
                spec,
                allow_process=row.tenant_id in process_tenants,
                default=self._default_tier,
            )
            request = request_for(spec, rule, strategy_of(spec, self._default_strategy))
            result = place(request, fleet) if rule.refused is None else None
            if not isinstance(result, Placement):
                reason = rule.refused if result is None else result.message
                if reason != row.pending_reason:
                    await self._writer.run(functools.partial(_note, row=row, reason=reason))
                continue
            session = sessions[result.node_id]
            hello = session.hello
            tier = tiers.choose(rule, hello.runtimes, hello.network_tiers, network=spec.network)
            if tier is None:
                continue
            key = (row.id, row.incarnation)
            session.reserve(key, spec.resources, row.tenant_id)
            fleet.update(session.view())
            placed = await self._writer.run(
                functools.partial(_assign, row=row, node_id=result.node_id, tier=tier)
            )
            if placed is None:
                session.release(key)
                fleet.update(session.view())
                continue
            session.send(SandboxStart(spec=_node_spec(placed)))

    async def steer(self) -> None:
        """Send what brings each sandbox on this replica's nodes toward its desired status,
        and apply the TTLs that ran out."""
        now = time.time()
        local = {s.node_id: s for s in self._registry.sessions()}
        async with self._db.read() as conn:
            rows = list(
                await conn.execute(
                    select(_S).where(
                        _S.c.status.in_(_LIVE),
                        (_S.c.status != _S.c.desired)
                        | (_S.c.expires_at < now)
                        | (_S.c.idle_at < now),
                    )
                )
            )
        for row in rows:
            if row.expires_at is not None and row.expires_at < now:
                await self._expire(row, idle=False)
                continue
            if row.idle_at is not None and row.idle_at < now:
                await self._expire(row, idle=True)
                continue
            step = next_step(Desired(row.desired), SandboxStatus(row.status))
            if step is Step.FINISH:
                await self._writer.run(functools.partial(self._finish, row=row))
                continue
            session = local.get(row.node_id or "")
            if session is None or step is None or step is Step.PLACE:
                continue
            action: Literal["stop", "pause", "resume"] = _ACTIONS[step]
            if step is Step.STOP and row.status != SandboxStatus.STOPPING.value:
                await self._writer.run(functools.partial(self._stopping, row=row))
            session.send(SandboxControl(id=row.id, incarnation=row.incarnation, action=action))

    async def _expire(self, row: Any, *, idle: bool) -> None:
        """Its TTL ran out, or (`idle`) its idle timeout: stop or pause it, as it asked."""
        spec = _spec(row)
        pausable = row.isolation is None or Tier(row.isolation) in PAUSABLE_TIERS
        # A sandbox whose tier cannot pause (the process tier) is stopped instead.
        pause = spec.on_expiry == ExpiryAction.PAUSE and pausable
        wanted = Desired.PAUSED if pause else Desired.STOPPED
        reason = f"idle for {spec.idle_timeout_s:g} s" if idle else "timeout"

        async def write(tx: Tx) -> None:
            current = await _load(tx, row.id)
            if idle:
                if (
                    current.idle_at is None
                    or current.idle_at >= tx.now
                    or current.desired != Desired.RUNNING.value
                ):
                    return  # awake again, or asked otherwise, meanwhile
                values: dict[str, Any] = {"desired": wanted.value, "idle_at": None}
            else:
                if current.expires_at is None or current.expires_at >= tx.now:
                    return  # refreshed meanwhile
                values = {"desired": wanted.value, "expires_at": None}
            if wanted == Desired.STOPPED and current.status == SandboxStatus.PENDING.value:
                values.update(status="stopped", ended_at=tx.now, end_reason=reason)
            elif wanted == Desired.STOPPED:
                values["end_reason"] = reason
            if await _swap(tx, current, **values):
                kind = "sandbox.idle" if idle else "sandbox.expired"
                tx.emit(kind, row.id, row.tenant_id, {"desired": wanted.value, "reason": reason})

        await self._writer.run(write)
        self._on_change()

    async def _finish(self, tx: Tx, row: Any) -> None:
        current = await _load(tx, row.id)
        if current.status == SandboxStatus.PENDING.value:
            await self._end(tx, current, SandboxEvent.STOP, current.end_reason or "stopped")

    async def _stopping(self, tx: Tx, row: Any) -> None:
        current = await _load(tx, row.id)
        status = SandboxStatus(current.status)
        if status in ON_NODE_STATUSES and status != SandboxStatus.STOPPING:
            await self._move(tx, current, {"status": apply(status, SandboxEvent.STOP).value})


async def _note(tx: Tx, row: Any, reason: str | None) -> None:
    await tx.conn.execute(
        update(_S)
        .where(and_(_S.c.id == row.id, _S.c.status == SandboxStatus.PENDING.value))
        .values(pending_reason=reason)
    )


async def _assign(tx: Tx, row: Any, node_id: str, tier: Tier) -> Any:
    current = await _load(tx, row.id)
    if (
        current.status != SandboxStatus.PENDING.value
        or current.incarnation != row.incarnation
        or current.desired == Desired.STOPPED.value
    ):
        return None
    values = {
        "status": apply(SandboxStatus.PENDING, SandboxEvent.PLACE).value,
        "node_id": node_id,
        "isolation": tier.value,
        "pending_reason": None,
    }
    if not await _swap(tx, current, **values):
        return None
    tx.emit(
        "sandbox.starting",
        row.id,
        row.tenant_id,
        {"status": "starting", "node_id": node_id, "incarnation": row.incarnation},
    )
    return await _load(tx, row.id)


def _resources(row: Any) -> Resources:
    return Resources.model_validate(row.spec.get("resources") or {})


def _node_spec(row: Any) -> NodeSandboxSpec:
    spec = row.spec
    return NodeSandboxSpec(
        id=row.id,
        incarnation=row.incarnation,
        tenant_id=row.tenant_id,
        resources=_resources(row),
        isolation=Tier(row.isolation),
        image=spec.get("image"),
        env=spec.get("env") or {},
        network=bool(spec.get("network")),
        home=None if spec.get("home") in (None, DEFAULT_HOME) else spec["home"],
        sudo=bool(spec.get("sudo")),
        desktop=spec.get("desktop"),
    )
