"""What every provider offers Weaver: machines it could start, and starting and stopping them.

A provider is where nodes come from. Weaver asks it for `offers()` (what it could start now,
within its quota), starts one with `provision()` when no connected node fits, and gives it back
with `release()`. The machine it starts runs a Shuttle that dials Weaver with a one-time join
token and says `Provisioned.node_name` in its hello, which is how Weaver tells which offer a
newly joined node came from. `instances()` lists what is running, so a restarted Weaver can
reconcile instead of leaking machines that cost money by the hour.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from treadle.domain.errors import TreadleError
from treadle.scheduler.offers import Offer

__all__ = [
    "JoinInfo",
    "Provider",
    "ProvisionError",
    "Provisioned",
    "Quota",
    "QuotaLedger",
    "check_startable",
    "new_node_name",
]


class ProvisionError(TreadleError):
    """A provider could not start (or stop) a machine: quota, a bad offer, or the cloud said no.

    The message says which and never contains the join token.
    """

    code = "provision_failed"


@dataclass(frozen=True, slots=True)
class JoinInfo:
    """How a new machine's Shuttle reaches Weaver.

    `token` is a one-time join token created by the caller for this machine alone: it travels
    to the machine (process environment, cloud user data), where it is harder to keep secret
    than in Weaver, so it must be worth nothing once the node has joined.
    """

    weaver_urls: tuple[str, ...]
    token: str = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.weaver_urls, str):  # a bare string would be split into characters
            object.__setattr__(self, "weaver_urls", (self.weaver_urls,))
        if not self.weaver_urls or not all(url.strip() for url in self.weaver_urls):
            raise ValueError("JoinInfo needs at least one Weaver URL")
        if any("," in url for url in self.weaver_urls):
            raise ValueError("give each Weaver URL separately, not comma-separated")
        if not self.token.strip():
            raise ValueError("JoinInfo needs a join token")

    @property
    def weaver_url(self) -> str:
        """The form the Shuttle's `--weaver` option takes: comma-separated, tried in turn."""
        return ",".join(self.weaver_urls)


@dataclass(frozen=True, slots=True)
class Provisioned:
    """One machine a provider started (or found running, after a Weaver restart)."""

    provider: str
    instance_id: str  # the provider's own id: what `release` takes
    node_name: str  # what its Shuttle says in hello
    offer: str  # Offer.name
    spot: bool
    started_at: datetime  # aware, UTC


@runtime_checkable
class Provider(Protocol):
    """The interface Weaver drives; LocalProvider, StaticProvider and AwsProvider implement it."""

    name: str

    def catalog(self) -> list[Offer]:
        """Every offer it has, whether the quota allows starting one now or not."""
        ...

    def offers(self) -> list[Offer]:
        """What it could start now: empty once its quota is used up."""
        ...

    async def provision(self, offer: Offer, *, spot: bool, join: JoinInfo) -> Provisioned:
        """Start a machine for `offer` whose Shuttle joins with `join`; raises ProvisionError."""
        ...

    async def release(self, instance_id: str) -> None:
        """Stop the machine. Releasing one that is already gone is not an error."""
        ...

    async def instances(self) -> list[Provisioned]:
        """The machines it has running (started by this Weaver or an earlier one)."""
        ...


def check_startable(provider: str, offers: Sequence[Offer], offer: Offer, *, spot: bool) -> None:
    """Raise ProvisionError unless `provider` has `offer` and can start it as asked."""
    if offer not in offers:
        raise ProvisionError(f"{offer.name} is not an offer of provider {provider!r}")
    if spot and offer.spot_price_per_hour is None:
        raise ProvisionError(f"{offer.name} has no spot price: it cannot start as spot")


def new_node_name(provider: str) -> str:
    """A node name nobody else uses: Weaver matches the joining node by it."""
    return f"{provider}-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class Quota:
    """The most a provider may have running at once; None: no limit of that kind.

    Clouds bill by the hour and a bug in a provisioning loop could start machines without end,
    so every provider takes a quota in its constructor and refuses to go past it.
    """

    max_instances: int | None = None
    max_vcpus: float | None = None

    def __post_init__(self) -> None:
        if self.max_instances is not None and self.max_instances < 0:
            raise ValueError("max_instances must be ≥ 0")
        if self.max_vcpus is not None and self.max_vcpus < 0:
            raise ValueError("max_vcpus must be ≥ 0")


class QuotaLedger:
    """Instances a provider holds against its quota: running ones and ones being started.

    A start holds its share before the first `await` and settles or drops it afterwards, so two
    provisions racing on one event loop cannot both take the last place.
    """

    def __init__(self, provider: str, quota: Quota) -> None:
        self._provider = provider
        self.quota = quota
        self._running: dict[str, int] = {}  # instance id → cpu millicores
        self._pending: dict[str, int] = {}  # node name → cpu millicores

    @property
    def count(self) -> int:
        return len(self._running) + len(self._pending)

    @property
    def cpu_millicores(self) -> int:
        return sum(self._running.values()) + sum(self._pending.values())

    def refusal(self, offer: Offer) -> str | None:
        """Why starting `offer` now would break the quota, or None."""
        quota = self.quota
        if quota.max_instances is not None and self.count + 1 > quota.max_instances:
            return (
                f"provider {self._provider!r} is at its quota of {quota.max_instances} "
                f"instance{'s' if quota.max_instances != 1 else ''}"
            )
        if quota.max_vcpus is not None:
            used = self.cpu_millicores / 1000
            if used + offer.cpu_millicores / 1000 > quota.max_vcpus:
                return (
                    f"provider {self._provider!r} would exceed its quota of {quota.max_vcpus:g} "
                    f"vCPUs ({used:g} in use, {offer.name} has {offer.cpu_millicores / 1000:g})"
                )
        return None

    def within(self, offers: Iterable[Offer]) -> list[Offer]:
        return [offer for offer in offers if self.refusal(offer) is None]

    def hold(self, node_name: str, offer: Offer) -> None:
        reason = self.refusal(offer)
        if reason is not None:
            raise ProvisionError(f"cannot start {offer.name}: {reason}", code="quota_exceeded")
        self._pending[node_name] = offer.cpu_millicores

    def settle(self, node_name: str, instance_id: str) -> None:
        self._running[instance_id] = self._pending.pop(node_name)

    def drop_pending(self, node_name: str) -> None:
        self._pending.pop(node_name, None)

    def drop(self, instance_id: str) -> None:
        self._running.pop(instance_id, None)

    def replace_running(self, running: Mapping[str, int]) -> None:
        """What the provider reports running now (after a restart, or another replica's
        starts), keeping the starts still under way."""
        self._running = dict(running)
