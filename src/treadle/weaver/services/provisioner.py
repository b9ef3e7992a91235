"""Autoscaling: start a node when open work fits no connected node but fits an offer, and
release started nodes that stay idle.

The dispatcher asks the scheduler with the providers' offers; a `Provision` answer comes
here. One node per offer is started at a time (the work it was started for is placed on it
as soon as it joins; more work that still fits nowhere asks again), within each provider's
quota and the fleet's budget. Each start gets a join token of its own, revoked once its
node has joined or given up on. A started node with nothing to run for
`scale_down_after_s` is drained, then released. A spot node that its provider reclaims is
simply lost: the reconciler requeues its work, which then avoids that node's region.

Started nodes are remembered in memory, with what each provider reports running: after a
restart `recover()` adopts them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from treadle.scheduler import Offer, Provision
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.providers.base import JoinInfo, Provider, Provisioned, ProvisionError
from treadle.weaver.providers.local import LocalProvider
from treadle.weaver.services.auth import AuthService
from treadle.weaver.services.nodes import NodeRegistry, NodeService

__all__ = ["Provisioner"]

log = logging.getLogger(__name__)
_TICK_S = 1.0


@dataclass(slots=True)
class _Started:
    provider: Provider
    offer: Offer
    provisioned: Provisioned | None = None  # None while the provider is starting it
    token: str | None = None
    since: float = field(default_factory=time.monotonic)
    joined: bool = False
    idle_since: float | None = None


class Provisioner:
    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        auth: AuthService,
        registry: NodeRegistry,
        nodes: NodeService,
        weaver_urls: Sequence[str],
        budget_per_hour: float | None,
        scale_down_after_s: float,
        join_timeout_s: float,
        on_joined: Callable[[], None],
    ) -> None:
        self._providers = {p.name: p for p in providers}
        self._auth = auth
        self._registry = registry
        self._nodes = nodes
        self._urls = tuple(weaver_urls)
        self._budget = budget_per_hour
        self._scale_down_after_s = scale_down_after_s
        self._join_timeout_s = join_timeout_s
        self._on_joined = on_joined
        self._started: dict[str, _Started] = {}  # by node name, or a placeholder while starting
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._providers)

    # what the dispatcher asks

    def offers(self) -> list[Offer]:
        """What may be started now: within quotas, the budget, and not already starting."""
        starting = {s.offer.name for s in self._started.values() if not s.joined}
        left = None if self._budget is None else self._budget - self.spend_per_hour()
        return [
            offer
            for provider in self._providers.values()
            for offer in provider.offers()
            if offer.name not in starting and (left is None or offer.price_per_hour <= left)
        ]

    def spend_per_hour(self) -> float:
        return sum(s.offer.price_per_hour for s in self._started.values())

    def want(self, provision: Provision) -> str:
        """Start `provision.offer` unless a node for it is already starting; returns what
        the waiting execution should say."""
        offer = provision.offer
        if not any(s.offer.name == offer.name and not s.joined for s in self._started.values()):
            provider = self._providers.get(offer.provider)
            if provider is None:
                return f"no provider {offer.provider!r} to start {offer.name}"
            placeholder = f"starting:{offer.name}:{time.monotonic()}"
            self._started[placeholder] = _Started(provider, offer)
            asyncio.get_running_loop().create_task(
                self._start(placeholder, provision), name=f"treadle-provision-{offer.name}"
            )
        spot = " (spot)" if provision.spot else ""
        return f"waiting for a node being started: {offer.name}{spot}, {provision.reason}"

    # lifecycle

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._loop(), name="treadle-provisioner")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for provider in self._providers.values():
            # Nodes on this machine are Weaver's children and go with it; cloud machines stay
            # and are adopted again by `recover` after a restart.
            if isinstance(provider, LocalProvider):
                await provider.aclose()

    async def recover(self) -> None:
        """Adopt what the providers have running (started before a restart)."""
        for provider in self._providers.values():
            try:
                running = await provider.instances()
            except ProvisionError as exc:
                log.warning("cannot list the nodes of provider %s: %s", provider.name, exc)
                continue
            for instance in running:
                offer = next((o for o in provider.offers() if o.name == instance.offer), None)
                if offer is not None and instance.node_name not in self._started:
                    self._started[instance.node_name] = _Started(
                        provider, offer, instance, joined=True
                    )

    async def _start(self, placeholder: str, provision: Provision) -> None:
        started = self._started[placeholder]
        try:
            started.token = await self._auth.issue_join_token()
            instance = await started.provider.provision(
                provision.offer, spot=provision.spot, join=JoinInfo(self._urls, started.token)
            )
        except Exception as exc:  # a provider fault must not stop the others
            log.warning("cannot start a node for %s: %s", provision.offer.name, exc)
            self._started.pop(placeholder, None)
            if started.token is not None:
                await self._auth.revoke_join_token(started.token)
            return
        started.provisioned = instance
        self._started.pop(placeholder, None)
        self._started[instance.node_name] = started
        log.info("started node %s for %s", instance.node_name, provision.offer.name)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                await self.tick()
            except Exception:
                log.exception("provisioner tick failed")

    async def tick(self) -> None:
        now = time.monotonic()
        sessions = {s.hello.name: s for s in self._registry.sessions()}
        for name, started in list(self._started.items()):
            if started.provisioned is None:
                continue
            session = sessions.get(name)
            if not started.joined:
                if session is not None:
                    started.joined, started.idle_since = True, now
                    await self._forget_token(started)
                    self._on_joined()
                elif now - started.since > self._join_timeout_s:
                    log.warning("node %s did not join in time; releasing it", name)
                    await self._release(name, started)
                continue
            if session is None:
                continue  # lost or reconnecting: the reconciler handles its work
            if session.attempts:
                started.idle_since = None
            elif started.idle_since is None:
                started.idle_since = now
            elif now - started.idle_since >= self._scale_down_after_s:
                # Drained first, so nothing is placed on it while it goes.
                await self._nodes.drain(session.node_id)
                if not session.attempts:
                    log.info(
                        "node %s idle for %.0f s; releasing it", name, now - started.idle_since
                    )
                    await self._release(name, started)

    async def _release(self, name: str, started: _Started) -> None:
        assert started.provisioned is not None
        try:
            await started.provider.release(started.provisioned.instance_id)
        except ProvisionError as exc:
            log.warning("cannot release node %s: %s", name, exc)
            return
        await self._forget_token(started)
        self._started.pop(name, None)

    async def _forget_token(self, started: _Started) -> None:
        if started.token is not None:
            await self._auth.revoke_join_token(started.token)
            started.token = None
