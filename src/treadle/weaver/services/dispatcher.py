"""Places open executions on connected nodes.

New executions arrive in memory from invoke; a periodic scan of the store picks up anything
else that is open and unassigned (after a restart, a lost assignment, a requeue). One task
places everything pending per round, commits all assignments in one transaction
(compare-and-swap on state, attempt and an empty node), and only then sends them.

Which tiers work may use is `treadle.scheduler.tiers`'s rule. The tenants allowed the process
tier are read with each scan, and again in the transaction that assigns work to that tier:
an assignment never rests on a permission the operator has withdrawn.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import bindparam, select

from treadle.domain.function import WorkloadSpec, render_command
from treadle.domain.resources import Tier
from treadle.protocol import Assign, AssignSpec
from treadle.scheduler import (
    Fleet,
    Offer,
    Placement,
    Provision,
    Request,
    Unschedulable,
    place,
    tiers,
)
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.metrics import WeaverMetrics
from treadle.weaver.services.auth import process_tier_tenants
from treadle.weaver.services.executions import ExecutionService, new_row
from treadle.weaver.services.functions import FunctionRecord, FunctionService
from treadle.weaver.services.nodes import NO_OUTPUT, NodeRegistry, NodeSession
from treadle.weaver.services.provisioner import Provisioner
from treadle.weaver.store import tables
from treadle.weaver.store.statements import EXECUTION_ASSIGN
from treadle.weaver.store.writer import Tx, Writer

__all__ = ["Dispatcher", "Pending", "request_for", "strategy_of"]

log = logging.getLogger(__name__)
_E = tables.executions
_SCAN_INTERVAL_S = 2.0
_EXHAUSTIVE_UP_TO = 64
# Replicas placing the same open work (PostgreSQL): each assigns only the rows it could
# lock, and skips those another replica is assigning instead of waiting for its commit.
_CLAIM = (
    select(_E.c.id)
    .where(
        _E.c.id.in_(bindparam("ids", expanding=True)),
        _E.c.state == "open",
        _E.c.node_id.is_(None),
    )
    .with_for_update(skip_locked=True)
)


def strategy_of(spec: WorkloadSpec, default: str, requested: str | None = None) -> str:
    """The strategy a placement uses: the one asked for with the work, else the spec's, else
    the operator's default."""
    return requested or spec.placement.strategy or default


def request_for(
    spec: WorkloadSpec,
    tier: tiers.TierRule,
    strategy: str,
    *,
    avoid_nodes: Iterable[str] = (),
    avoid_regions: Iterable[str] = (),
) -> Request:
    """The placement question for a workload (function or sandbox) under `tier`, with
    `strategy` (`strategy_of` says which)."""
    rules = spec.placement
    chosen = strategy
    return Request(
        resources=spec.resources,
        isolation=tier.isolation,
        min_isolation=None if tier.isolation is not None else tier.floor,
        labels=rules.labels,
        regions=tuple(rules.regions),
        zones=tuple(rules.zones),
        countries=tuple(rules.countries),
        strategy=chosen,
        weights=rules.weights if chosen == "custom" else None,
        tolerations=frozenset(rules.tolerations),
        max_price_per_hour=rules.max_price_per_hour,
        spot=rules.spot,
        avoid_nodes=frozenset(avoid_nodes),
        avoid_regions=frozenset(avoid_regions),
        network=spec.network,
    )


@dataclass(slots=True)
class Pending:
    id: str
    tenant_id: str
    attempt: int
    function: FunctionRecord
    args: dict[str, Any]
    stdin: str | None
    reason: str | None = None
    # What placement carries over for this execution: the invoke's strategy, the nodes and
    # regions where earlier attempts were lost (`reports.retry_placement`).
    hint: dict[str, Any] | None = None
    # When this replica queued it (monotonic): for the dispatch latency it measures.
    since: float = field(default_factory=time.monotonic)
    # The batch that made it, if any.
    batch: str | None = None
    # Just made by this replica (an invoke, a batch): its attempt has reported nothing, to
    # anyone. One found by a scan may be an attempt placed before and given back.
    fresh: bool = False

    @classmethod
    def from_row(cls, row: Any, function: FunctionRecord, *, fresh: bool = False) -> Pending:
        hint = row.placement if row.node_id is None and isinstance(row.placement, dict) else None
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            attempt=row.attempt,
            function=function,
            args=row.args,
            stdin=row.stdin,
            reason=row.pending_reason,
            hint=hint,
            batch=row.batch_id,
            fresh=fresh,
        )

    @property
    def shape(self) -> tuple[Any, ...]:
        """Executions of one shape get the same answer from the same fleet."""
        hint = self.hint or {}
        return (
            self.tenant_id,
            self.function.spec.name,
            self.function.version,
            hint.get("requested_strategy"),
            tuple(hint.get("avoid_nodes") or ()),
            tuple(hint.get("avoid_regions") or ()),
        )

    def request(self, default_strategy: str, tier: tiers.TierRule) -> Request:
        hint = self.hint or {}
        spec = self.function.spec
        return request_for(
            spec,
            tier,
            strategy_of(spec, default_strategy, hint.get("requested_strategy")),
            avoid_nodes=hint.get("avoid_nodes") or (),
            avoid_regions=hint.get("avoid_regions") or (),
        )

    def assignment(self, tier: Tier) -> Assign:
        spec = self.function.spec
        # Built from what was validated when stored (the function's spec, the invoke's args):
        # validating it again for every execution was a tenth of placement's time.
        return Assign.model_construct(
            spec=AssignSpec.model_construct(
                id=self.id,
                attempt=self.attempt,
                tenant_id=self.tenant_id,
                function=spec.name,
                version=self.function.version,
                argv=render_command(spec.command, self.args),
                env=spec.env,
                source=spec.source,
                source_name=spec.source_name,
                args=self.args,
                stdin=self.stdin,
                timeout_s=spec.timeout_s,
                resources=spec.resources,
                isolation=tier,
                image=spec.image,
                network=spec.network,
            )
        )


@dataclass(slots=True)
class _Decision:
    pending: Pending
    session: NodeSession
    placement_result: Placement
    tier: Tier
    # False when the node already held this attempt (it was placed twice): then this
    # decision must not release what the first placement reserved.
    reserved: bool

    @property
    def key(self) -> tuple[str, int]:
        return self.pending.id, self.pending.attempt

    def forbidden(self, process_tenants: frozenset[str] | None) -> bool:
        """Whether the tenant, as last read, may not have this decision's tier."""
        return (
            process_tenants is not None
            and self.tier is Tier.PROCESS
            and self.pending.tenant_id not in process_tenants
        )

    def undo(self) -> None:
        if self.reserved:
            self.reserved = False
            self.session.release(self.key)

    def placement(self) -> dict[str, Any]:
        """The decision as stored on the execution."""
        hello = self.session.hello
        return {
            **self.placement_result.to_dict(),
            **(self.pending.hint or {}),
            "tier": self.tier.value,
            "region": hello.region,
            "spot": hello.spot,
        }


class Dispatcher:
    def __init__(
        self,
        writer: Writer,
        registry: NodeRegistry,
        executions: ExecutionService,
        functions: FunctionService,
        *,
        default_strategy: str = "balanced",
        default_min_isolation: Tier = tiers.DEFAULT,
        provisioner: Provisioner | None = None,
        metrics: WeaverMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._default_strategy = default_strategy
        self._default_tier = default_min_isolation
        self._process_tenants: frozenset[str] = frozenset()
        self._provisioner = provisioner
        # Sampling for large fleets (see treadle.scheduler): seeded per process, so a
        # decision can be replayed from the same fleet and seed.
        self._random = random.Random(0x7EAD1E)
        self._writer = writer
        self._registry = registry
        self._executions = executions
        self._functions = functions
        self._pending: dict[str, Pending] = {}
        self._wake = asyncio.Event()
        self._scan_due = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(), name="treadle-dispatcher"),
            asyncio.create_task(self._scan_timer(), name="treadle-dispatch-scan"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    def enqueue(self, pending: Pending) -> None:
        self._pending.setdefault(pending.id, pending)
        self._wake.set()

    def forget(self, execution_id: str) -> None:
        self._pending.pop(execution_id, None)

    def wake(self) -> None:
        self._wake.set()

    def scan_soon(self) -> None:
        self._scan_due = True
        self._wake.set()

    async def _scan_timer(self) -> None:
        while True:
            await asyncio.sleep(_SCAN_INTERVAL_S)
            self.scan_soon()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._scan_due:
                    self._scan_due = False
                    await self._scan()
                await self._round()
            except Exception:
                log.exception("dispatch round failed; retrying on the next wake-up")
                self.scan_soon()

    async def _scan(self) -> None:
        self._process_tenants = await self._writer.run(_process_tenants_in)
        # After a restart every open execution comes through here: read each function
        # version once, not once per execution.
        versions: dict[tuple[str, str, int], FunctionRecord | None] = {}
        for row in await self._executions.open_unassigned(exclude=set(self._pending)):
            key = (row.tenant_id, row.function, row.version)
            if key not in versions:
                try:
                    versions[key] = await self._functions.get(*key, include_deleted=True)
                except Exception:
                    log.exception("execution %s names a function that cannot be loaded", row.id)
                    versions[key] = None
            function = versions[key]
            if function is not None:
                self._pending.setdefault(row.id, Pending.from_row(row, function))

    async def _round(self) -> None:
        if not self._pending:
            return
        sessions = {s.node_id: s for s in self._registry.sessions()}
        fleet = Fleet(s.view() for s in sessions.values())
        # Small fleets are compared whole, so every decision can name its runners-up.
        sample = self._random if len(fleet) > _EXHAUSTIVE_UP_TO else None
        decisions: list[_Decision] = []
        reasons: list[Pending] = []
        provisioner = self._provisioner
        offers = provisioner.offers() if provisioner is not None and provisioner.enabled else ()
        # Whether this round's work could use the process tier: then the transaction that
        # records it reads the tenants' permission afresh.
        wants_process = False
        # Executions of one shape get the same answer from the same fleet: their tier rule is
        # worked out once, and once one of them does not fit, none of the rest is tried.
        shapes: dict[tuple[Any, ...], list[Pending]] = {}
        for pending in self._pending.values():
            shapes.setdefault(pending.shape, []).append(pending)
        for members in shapes.values():
            rule, could_use_process = self._rule(members[0])
            wants_process |= could_use_process
            for at, pending in enumerate(members):
                decided = self._decide(pending, rule, fleet, sessions, offers, sample)
                if decided is None:
                    continue
                if not isinstance(decided, _Decision):
                    reason = self._reason(decided)
                    for waiting in members[at:]:
                        if waiting.reason != reason:
                            waiting.reason = reason
                            reasons.append(waiting)
                    break
                del self._pending[pending.id]
                decisions.append(decided)
        if not decisions and not reasons:
            return
        try:
            assigned, process_tenants = await self._writer.run(
                self._record(decisions, reasons, wants_process)
            )
        except Exception:
            for decision in decisions:
                decision.undo()
                self._pending.setdefault(decision.pending.id, decision.pending)
            raise
        if process_tenants is not None and process_tenants != self._process_tenants:
            self._process_tenants = process_tenants
            self._wake.set()  # what waited on a permission, or was refused one, goes again
        for decision in decisions:
            if decision.pending.id not in assigned:
                decision.undo()
                if decision.forbidden(process_tenants):
                    self._pending.setdefault(decision.pending.id, decision.pending)
                continue
            self._send(decision)

    def _decide(
        self,
        pending: Pending,
        rule: tiers.TierRule,
        fleet: Fleet,
        sessions: dict[str, NodeSession],
        offers: Sequence[Offer],
        sample: random.Random | None,
    ) -> _Decision | Provision | Unschedulable | str | None:
        """Where `pending` goes under `rule`: a decision, its node's capacity reserved for it
        (and `fleet` told); or why it cannot be placed; None: a bug, logged."""
        result = self._place(pending, rule, fleet, offers, sample)
        if not isinstance(result, Placement):
            return result
        session = sessions[result.node_id]
        hello = session.hello
        spec = pending.function.spec
        tier = tiers.choose(rule, hello.runtimes, hello.network_tiers, network=spec.network)
        if tier is None:  # placement and the rule disagree: a bug, not the work's fault
            log.error("no tier on %s admits %s (%s)", result.node_id, pending.id, rule)
            return None
        reserved = session.reserve(
            (pending.id, pending.attempt),
            spec.resources,
            pending.tenant_id,
            (pending.tenant_id, spec.name, pending.function.version),
            batch=pending.batch,
            # A fresh attempt has stored no output and billed no use: its reports need not
            # read the row. Anything else may have (an attempt given back keeps its number).
            output=NO_OUTPUT if pending.fresh else None,
        )
        fleet.update(session.view())
        return _Decision(pending, session, result, tier, reserved)

    def _send(self, decision: _Decision) -> None:
        """Once its assignment is committed: to the node, wherever its link is now."""
        current = self._registry.get(decision.session.node_id)
        if current is None:
            return  # gone while this was committed: the reconciler moves the work
        if current is not decision.session:
            # The node reconnected meanwhile; its new session must hold and send it.
            decision.undo()
            current.reserve(
                decision.key,
                decision.pending.function.spec.resources,
                decision.pending.tenant_id,
                batch=decision.pending.batch,
            )
        current.send(decision.pending.assignment(decision.tier))
        if self._metrics is not None:
            self._metrics.dispatched.inc()
            self._metrics.dispatch_latency.observe(time.monotonic() - decision.pending.since)

    async def place_new(
        self, tx: Tx, values: dict[str, Any], function: FunctionRecord
    ) -> _Decision | None:
        """Place a new execution in the transaction that stores it (`values`, its row, is
        given its node), when nothing waits before it, it is the transaction's first, and a
        node has room: it saves the round's transaction, and its latency. None: it goes the
        usual way (`enqueue` once stored). A decision is sent once committed; forgotten (its
        capacity freed) if the transaction fails, or when the caller does not store the row
        after all (`_Decision.undo`)."""
        if self._pending or _PLACED_NEW in tx.scratch:
            # Work that waits goes first. And one invoke a transaction: under load, when
            # transactions hold many, rounds place them for less (one view of the fleet
            # for them all, not one each).
            return None
        tx.scratch[_PLACED_NEW] = True
        sessions = {s.node_id: s for s in self._registry.sessions()}
        if not sessions or len(sessions) > _EXHAUSTIVE_UP_TO:
            return None  # a large fleet is placed in rounds
        pending = Pending.from_row(new_row(values), function, fresh=True)
        rule, _ = self._rule(pending)
        fleet = Fleet(s.view() for s in sessions.values())
        decided = self._decide(pending, rule, fleet, sessions, (), None)
        if not isinstance(decided, _Decision):
            return None
        tx.undo.append(decided.undo)
        if decided.tier is Tier.PROCESS and decided.forbidden(await _process_tenants_in(tx)):
            decided.undo()
            return None
        values.update(
            node_id=decided.session.node_id,
            placement=decided.placement(),
            isolation=decided.tier.value,
        )

        def send() -> None:
            if decided.reserved:  # not undone: the row was stored as placed
                self._send(decided)

        tx.after_commit.append(send)
        return decided

    def _rule(self, pending: Pending) -> tuple[tiers.TierRule, bool]:
        """The tiers `pending` may use, as far as this replica last read its tenant's
        permission (the transaction that assigns the process tier reads it again), and
        whether it could use the process tier with the permission."""
        spec = pending.function.spec
        rule = tiers.rule_for(spec, allow_process=True, default=self._default_tier)
        if not rule.admits_process:
            return rule, False
        if pending.tenant_id not in self._process_tenants:
            rule = tiers.rule_for(spec, allow_process=False, default=self._default_tier)
        return rule, True

    def _reason(self, result: Provision | Unschedulable | str) -> str:
        """What an execution that could not be placed says while it waits."""
        if isinstance(result, str):
            return result
        if isinstance(result, Provision) and self._provisioner is not None:
            return self._provisioner.want(result)
        return result.message

    def _place(
        self,
        pending: Pending,
        rule: tiers.TierRule,
        fleet: Fleet,
        offers: Sequence[Offer],
        sample: random.Random | None,
    ) -> Placement | Provision | Unschedulable | str:
        if rule.refused is not None:
            return rule.refused
        request = pending.request(self._default_strategy, rule)
        result = place(request, fleet, offers, sample=sample)
        if isinstance(result, Placement) or not (request.avoid_nodes or request.avoid_regions):
            return result
        # Avoiding where earlier attempts were lost is a preference: with nowhere else to go
        # (one node, restarted), the work runs there rather than waiting for nothing.
        again = place(
            replace(request, avoid_nodes=frozenset(), avoid_regions=frozenset()),
            fleet,
            (),
            sample=sample,
        )
        return again if isinstance(again, Placement) else result

    @staticmethod
    def _record(decisions: list[_Decision], reasons: list[Pending], wants_process: bool) -> Any:
        async def write(tx: Tx) -> tuple[set[str], frozenset[str] | None]:
            assigned: set[str] = set()
            claimed: set[str] | None = None
            verify = wants_process or any(d.tier is Tier.PROCESS for d in decisions)
            process_tenants = await _process_tenants_in(tx) if verify else None
            if decisions and tx.db.dialect == "postgresql":
                ids = [d.pending.id for d in decisions]
                claimed = set((await tx.conn.execute(_CLAIM, {"ids": ids})).scalars())
            for d in decisions:
                if claimed is not None and d.pending.id not in claimed:
                    continue
                if d.forbidden(process_tenants):
                    continue
                placement = d.placement()
                # Open and unassigned when placed, and claimed (PostgreSQL): deferred, the
                # round's assignments go together (`Tx.swap`).
                swapped = await tx.swap(
                    d.pending.id,
                    EXECUTION_ASSIGN,
                    {
                        "_id": d.pending.id,
                        "_attempt": d.pending.attempt,
                        "node_id": d.session.node_id,
                        "placement": placement,
                        "isolation": d.tier.value,
                        "pending_reason": None,
                    },
                )
                if swapped:
                    assigned.add(d.pending.id)
            for pending in reasons:
                # Only while still unplaced: another replica may have placed it meanwhile.
                await tx.conn.execute(
                    EXECUTION_ASSIGN,
                    {
                        "_id": pending.id,
                        "_attempt": pending.attempt,
                        "pending_reason": pending.reason,
                    },
                )
            return assigned, process_tenants

        return write


async def _process_tenants_in(tx: Tx) -> frozenset[str]:
    """The tenants allowed the process tier, read once per transaction (an invoke placed as
    it is stored and a round's assignments, committed together, both ask)."""
    allowed: frozenset[str] | None = tx.scratch.get(_PROCESS_TENANTS)
    if allowed is None:
        allowed = tx.scratch[_PROCESS_TENANTS] = await process_tier_tenants(tx.conn)
    return allowed


_PROCESS_TENANTS = "process-tenants"
_PLACED_NEW = "placed-new"
