"""The Weaver process's parts, wired together, with their start/stop order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from treadle.weaver.background import cancel_and_wait
from treadle.weaver.events.bus import EventBus, InProcessBus
from treadle.weaver.events.nats import NatsBus
from treadle.weaver.metrics import WeaverMetrics
from treadle.weaver.providers.config import FleetConfig, load_fleet_config
from treadle.weaver.services.auth import AuthService
from treadle.weaver.services.batches import BatchService, Created, MapRequest
from treadle.weaver.services.dispatcher import Dispatcher, Pending
from treadle.weaver.services.executions import ExecutionService, InvokeRequest
from treadle.weaver.services.export import UsageExporter
from treadle.weaver.services.fleet import FleetListener
from treadle.weaver.services.followers import Followers
from treadle.weaver.services.functions import FunctionService
from treadle.weaver.services.leadership import leadership_for
from treadle.weaver.services.nodes import NodeRegistry, NodeService
from treadle.weaver.services.provisioner import Provisioner
from treadle.weaver.services.quotas import QuotaService
from treadle.weaver.services.reconciler import Reconciler
from treadle.weaver.services.reports import ReportService
from treadle.weaver.services.retention import Retention
from treadle.weaver.services.sandboxes import SandboxService
from treadle.weaver.services.streams import StreamHub
from treadle.weaver.services.usage import UsageService
from treadle.weaver.settings import WeaverSettings
from treadle.weaver.store import migrate
from treadle.weaver.store.database import Database
from treadle.weaver.store.finals import Finals
from treadle.weaver.store.writer import Writer

__all__ = ["Weaver"]

log = logging.getLogger(__name__)
_SANDBOX_PASS_S = 1.0


class Weaver:
    def __init__(self, settings: WeaverSettings, bus: EventBus | None = None) -> None:
        self.settings = settings
        self.metrics = WeaverMetrics()
        self.db = Database(settings.resolved_database_url())
        self._nats: NatsBus | None = None
        if bus is None and settings.nats_url:
            prefix = settings.nats_stream.lower()
            bus = self._nats = NatsBus(
                settings.nats_url, stream=settings.nats_stream, prefix=prefix
            )
        self.bus: EventBus = bus or InProcessBus()
        finals = Finals()
        self.writer = Writer(self.db, self.bus, finals=finals)
        self.auth = AuthService(self.db, self.writer)
        self.functions = FunctionService(self.db, self.writer)
        self.registry = NodeRegistry(on_change=self._capacity_changed)
        self.nodes = NodeService(
            self.db, self.writer, self.registry, down_after_s=settings.node_down_after_s
        )
        self.executions = ExecutionService(
            self.db,
            self.writer,
            self.bus,
            self.functions,
            settings,
            on_cancel=self._cancelled,
            finals=finals,
        )
        fleet_config = (
            load_fleet_config(settings.providers_file)
            if settings.providers_file is not None
            else FleetConfig()
        )
        self.provisioner = Provisioner(
            fleet_config.build(settings.home),
            auth=self.auth,
            registry=self.registry,
            nodes=self.nodes,
            weaver_urls=[settings.public_url or f"http://{settings.host}:{settings.port}"],
            budget_per_hour=fleet_config.budget_per_hour,
            scale_down_after_s=fleet_config.scale_down_after_s,
            join_timeout_s=fleet_config.join_timeout_s,
            on_joined=self._capacity_changed,
        )
        self.dispatcher = Dispatcher(
            self.writer,
            self.registry,
            self.executions,
            self.functions,
            default_strategy=settings.default_strategy,
            default_min_isolation=settings.default_min_isolation,
            provisioner=self.provisioner,
            metrics=self.metrics,
        )
        self.sandboxes = SandboxService(
            self.db,
            self.writer,
            self.bus,
            self.registry,
            default_strategy=settings.default_strategy,
            default_min_isolation=settings.default_min_isolation,
            on_change=self._sandboxes_changed,
            max_per_tenant=settings.max_sandboxes_per_tenant,
        )
        self.streams = StreamHub(settings.max_exec_streams_per_tenant)
        self.followers = Followers(settings.max_followers_per_tenant)
        self._sandbox_wake = asyncio.Event()
        self._sandbox_task: asyncio.Task[None] | None = None
        self.quotas = QuotaService(self)
        self.executions.admit = self.quotas.admit
        self.batches = BatchService(
            self.db, self.writer, self.bus, self.functions, self.executions, settings
        )
        self.batches.admissible = self.quotas.admissible
        self.sandboxes.admit = self.quotas.admit
        self.usage = UsageService(self.db, self.metrics)
        self.exporter = (
            UsageExporter(
                self, settings.openmeter_url, settings.openmeter_token, settings.openmeter_batch
            )
            if settings.openmeter_url
            else None
        )
        self.reports = ReportService(
            on_capacity=self._capacity_changed, on_requeue=self.dispatcher.scan_soon
        )
        self.reconciler = Reconciler(
            self.db,
            self.writer,
            self.registry,
            self.reports,
            down_after_s=settings.node_down_after_s,
            startup_grace_s=settings.node_startup_grace_s,
            executions=self.executions,
            unschedulable_after_s=settings.unschedulable_after_s,
            forget=self.dispatcher.forget,
            leadership=leadership_for(self.db.url, self.db.dialect),
            sandboxes=self.sandboxes,
            retention=Retention(self.writer, settings.history_retention_s),
        )
        self.fleet = FleetListener(
            self.bus, self.registry, on_remote_open=self.dispatcher.scan_soon
        )

    async def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, self.db.url)
        if self._nats is not None:
            await self._nats.connect()
        self.fleet.start()
        self.writer.start()
        await self.auth.bootstrap(self.settings.home)
        await self.provisioner.recover()
        self.dispatcher.start()
        self.reconciler.start()
        self.provisioner.start()
        self._sandbox_task = asyncio.create_task(self._sandbox_loop(), name="treadle-sandboxes")
        if self.exporter is not None:
            self.exporter.start()
        self.quotas.start()

    async def stop(self) -> None:
        for session in self.registry.sessions():
            session.close()
        await cancel_and_wait(self._sandbox_task)
        if self.exporter is not None:
            await self.exporter.stop()
        await self.quotas.stop()
        await self.reconciler.stop()
        await self.dispatcher.stop()
        await self.provisioner.stop()
        await self.writer.stop()
        await self.fleet.stop()
        await self.bus.close()
        await self.db.close()

    async def invoke(
        self,
        tenant_id: str,
        name: str,
        body: InvokeRequest,
        version: int | None,
        wait: float | None,
    ) -> Any:
        invoked = await self.executions.invoke(
            tenant_id, name, body, version, place=self.dispatcher.place_new
        )
        if invoked.created and not invoked.placed:
            self.dispatcher.enqueue(Pending.from_row(invoked.row, invoked.function, fresh=True))
        if wait:
            # A fresh execution cannot have ended before this call subscribes: its node hears
            # of it only once the commit that stores it is done, and the node's reports
            # come back over the network after this task has run on. No need to read it.
            row = invoked.row if invoked.created else None
            return await self.executions.wait(tenant_id, invoked.row.id, wait, row)
        return invoked.row

    async def map(
        self,
        tenant_id: str,
        name: str,
        body: MapRequest,
        version: int | None,
        body_bytes: int | None = None,
    ) -> Created:
        """Store a batch's executions in one transaction and hand them to placement
        together."""
        created = await self.batches.submit(tenant_id, name, body, version, body_bytes)
        for row in created.executions:
            self.dispatcher.enqueue(Pending.from_row(row, created.function, fresh=True))
        return created

    def _capacity_changed(self) -> None:
        self.dispatcher.wake()
        # Every execution that ends frees capacity; the sandbox pass (reads of the store)
        # runs for it only while sandboxes wait for a node, and once a second regardless.
        if self.sandboxes.waiting:
            self._sandbox_wake.set()

    def _sandboxes_changed(self) -> None:
        self._sandbox_wake.set()

    async def _sandbox_loop(self) -> None:
        """Place pending sandboxes and steer the others toward their desired status, when
        something changed and at least once a second (for TTLs)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SANDBOX_PASS_S):
                    await self._sandbox_wake.wait()
            self._sandbox_wake.clear()
            try:
                await self.sandboxes.place()
                await self.sandboxes.steer()
            except Exception:
                log.exception("sandbox pass failed; trying again")

    def _cancelled(self, before: Any) -> None:
        # The node, wherever its link is, hears of it through the fleet order the cancel
        # published (fleet.py).
        self.dispatcher.forget(before.id)

    @property
    def leads(self) -> bool:
        return self.reconciler.leading_since is not None
