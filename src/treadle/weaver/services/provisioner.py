"""Autoscaling: start a node when open work fits no connected node but fits an offer, and
release started nodes that stay idle.

The dispatcher asks the scheduler with the providers' offers; a `Provision` answer comes
here. One node per offer is started at a time (the work it was started for is placed on it
as soon as it joins; more work that still fits nowhere asks again), within each provider's
quota and the fleet's budget. An offer being started stays visible to the scheduler, so
the same work keeps waiting for that node instead of starting the next-best offer too; an
offer whose start failed is left out for a while (doubling up to 5 minutes).

Each start gets a join token of its own that expires with `join_timeout_s` and is spent
when the node joins. A started node with nothing to run for `scale_down_after_s` is
drained, then released; one that has not joined, or has been gone, for `join_timeout_s` is
released. A spot node its provider reclaims is simply lost: the reconciler requeues its
work, which then avoids that node and its region where it can.

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
from treadle.weaver.services.nodes import NodeRegistry, NodeService, NodeSession

__all__ = ["Provisioner"]

log = logging.getLogger(__name__)
_TICK_S = 1.0
_COOLDOWN_S = 5.0
_COOLDOWN_MAX_S = 300.0
_RETRY_S = 30.0


@dataclass(slots=True)
class _Started:
    provider: Provider
    offer: Offer
    provisioned: Provisioned | None = None  # None while the provider is starting it
    since: float = field(default_factory=time.monotonic)
    joined: bool = False
    idle_since: float | None = None
    missing_since: float | None = None
    retry_at: float = 0.0


@dataclass(slots=True)
class _Cooldown:
    until: float
    failures: int


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
        self._cooldown: dict[str, _Cooldown] = {}  # by offer name
        self._starts: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def enabled(self) -> bool:
        return bool(self._providers)

    # what the dispatcher asks

    def offers(self) -> list[Offer]:
        """What the scheduler may choose from: the offers being started (so work keeps
        waiting for them), and those that may be started now, within quotas and the budget
        and not cooling down after a failed start."""
        now = time.monotonic()
        starting = {s.offer.name: s.offer for s in self._started.values() if not s.joined}
        left = self._budget_left()
        found = list(starting.values())
        for provider in self._providers.values():
            for offer in provider.offers():
                cooling = self._cooldown.get(offer.name)
                if offer.name in starting or (cooling is not None and cooling.until > now):
                    continue
                if left is None or offer.price_per_hour <= left:
                    found.append(offer)
        return found

    def spend_per_hour(self) -> float:
        return sum(s.offer.price_per_hour for s in self._started.values())

    def want(self, provision: Provision) -> str:
        """Start `provision.offer` unless a node for it is already starting; returns what
        the waiting execution should say."""
        offer = provision.offer
        spot = " (spot)" if provision.spot else ""
        waiting = f"waiting for a node being started: {offer.name}{spot}, {provision.reason}"
        if any(s.offer.name == offer.name and not s.joined for s in self._started.values()):
            return waiting
        provider = self._providers.get(offer.provider)
        if provider is None:
            return f"no provider {offer.provider!r} to start {offer.name}"
        left = self._budget_left()
        if left is not None and offer.price_per_hour > left:
            return f"{offer.name} would exceed the fleet budget of {self._budget}/h"
        if self._stopping:
            return "not starting nodes: Weaver is stopping"
        placeholder = f"starting:{offer.name}:{time.monotonic()}"
        self._started[placeholder] = _Started(provider, offer)
        task = asyncio.get_running_loop().create_task(
            self._start(placeholder, provision), name=f"treadle-provision-{offer.name}"
        )
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)
        return waiting

    def _budget_left(self) -> float | None:
        return None if self._budget is None else self._budget - self.spend_per_hour()

    # lifecycle

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._loop(), name="treadle-provisioner")

    async def stop(self) -> None:
        """Call after the dispatcher stopped: nothing asks for nodes any more."""
        self._stopping = True
        await cancel_and_wait(*self._starts)
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for provider in self._providers.values():
            # Nodes on this machine are Weaver's children and go with it; cloud machines stay
            # and are adopted again by `recover` after a restart.
            if isinstance(provider, LocalProvider):
                await provider.aclose()

    async def recover(self) -> None:
        """Adopt what the providers have running (started before a restart): they count
        against the budget, and are released when idle, or when they never join."""
        for provider in self._providers.values():
            try:
                running = await provider.instances()
            except ProvisionError as exc:
                log.warning("cannot list the nodes of provider %s: %s", provider.name, exc)
                continue
            catalog = {offer.name: offer for offer in provider.catalog()}
            for instance in running:
                offer = catalog.get(instance.offer)
                if offer is None:
                    log.warning(
                        "node %s of provider %s runs offer %s, which it no longer has; "
                        "releasing it",
                        instance.node_name,
                        provider.name,
                        instance.offer,
                    )
                    await self._release_quietly(provider, instance.instance_id)
                elif instance.node_name not in self._started:
                    self._started[instance.node_name] = _Started(provider, offer, instance)

    async def _start(self, placeholder: str, provision: Provision) -> None:
        started = self._started[placeholder]
        offer = provision.offer
        try:
            token = await self._auth.issue_join_token(self._join_timeout_s)
            instance = await started.provider.provision(
                offer, spot=provision.spot, join=JoinInfo(self._urls, token)
            )
        except Exception as exc:  # a provider fault must not stop the others
            cooling = self._cooldown.get(offer.name)
            failures = cooling.failures + 1 if cooling else 1
            wait = min(_COOLDOWN_MAX_S, _COOLDOWN_S * 2 ** (failures - 1))
            self._cooldown[offer.name] = _Cooldown(time.monotonic() + wait, failures)
            log.warning("cannot start a node for %s (again in %.0f s): %s", offer.name, wait, exc)
            return
        finally:
            # Cancelled or failed, the placeholder goes; the token expires on its own.
            self._started.pop(placeholder, None)
        self._cooldown.pop(offer.name, None)
        started.provisioned = instance
        started.since = time.monotonic()
        self._started[instance.node_name] = started
        log.info("started node %s for %s", instance.node_name, offer.name)

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
            if started.provisioned is None or started.retry_at > now:
                continue
            try:
                await self._check(name, started, sessions.get(name), now)
            except Exception:  # one node's trouble must not hold up the others
                log.exception("checking started node %s failed", name)
                started.retry_at = now + _RETRY_S

    async def _check(
        self, name: str, started: _Started, session: NodeSession | None, now: float
    ) -> None:
        if not started.joined:
            if session is not None:
                started.joined, started.idle_since = True, now
                self._on_joined()
            elif now - started.since > self._join_timeout_s:
                log.warning("node %s did not join in time; releasing it", name)
                await self._release(name, started, now)
            return
        if session is None:
            # Lost (a crash, a reclaimed spot machine) or reconnecting: the reconciler moves
            # its work; the machine is released once it has been gone for long.
            if started.missing_since is None:
                started.missing_since = now
            elif now - started.missing_since > self._join_timeout_s:
                log.warning("node %s has been gone for long; releasing it", name)
                await self._release(name, started, now)
            return
        started.missing_since = None
        if session.attempts:
            started.idle_since = None
        elif started.idle_since is None:
            started.idle_since = now
        elif now - started.idle_since >= self._scale_down_after_s:
            # Drained first, so nothing is placed on it while it goes.
            await self._nodes.drain(session.node_id)
            if not session.attempts:
                log.info("node %s idle for %.0f s; releasing it", name, now - started.idle_since)
                await self._release(name, started, now)

    async def _release(self, name: str, started: _Started, now: float) -> None:
        assert started.provisioned is not None
        try:
            await started.provider.release(started.provisioned.instance_id)
        except ProvisionError as exc:
            log.warning("cannot release node %s (again in %.0f s): %s", name, _RETRY_S, exc)
            started.retry_at = now + _RETRY_S
            return
        self._started.pop(name, None)

    @staticmethod
    async def _release_quietly(provider: Provider, instance_id: str) -> None:
        try:
            await provider.release(instance_id)
        except ProvisionError as exc:
            log.warning("cannot release %s: %s", instance_id, exc)
