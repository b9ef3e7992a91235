"""Hosts that lease their spare capacity: they join on their own, nothing is started for them.

An operator hands a host owner a join command; the host's Shuttle declares its own price and
place in its hello. So there is nothing to offer or provision here, and nothing to stop: the
owner takes the host away by stopping its Shuttle (or the operator drains the node).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from treadle.scheduler.offers import Offer
from treadle.weaver.providers.base import JoinInfo, Provisioned, ProvisionError
from treadle.weaver.providers.command import shuttle_options

__all__ = ["StaticProvider", "static_join_command"]


class StaticProvider:
    def __init__(self, name: str = "static") -> None:
        self.name = name

    def catalog(self) -> list[Offer]:
        """Every offer, quota or not: what running machines are matched against."""
        return []

    def offers(self) -> list[Offer]:
        return []

    async def provision(self, offer: Offer, *, spot: bool, join: JoinInfo) -> Provisioned:
        raise ProvisionError(
            f"static hosts join on their own: provider {self.name!r} cannot start {offer.name}"
        )

    async def release(self, instance_id: str) -> None:
        return None

    async def instances(self) -> list[Provisioned]:
        return []


def static_join_command(
    weaver_url: str,
    token: str,
    *,
    price: float,
    region: str,
    zone: str | None = None,
    country: str | None = None,
    labels: Mapping[str, str] | None = None,
    name: str | None = None,
    provider: str = "static",
) -> str:
    """The shell command line a host owner runs to lease the host to this fleet.

    The token goes in the environment, not in an option: a Shuttle runs for months, and its
    command line is readable by every user of the host for all that time.
    """
    options = shuttle_options(
        weaver_url=weaver_url,
        node_name=name,
        provider=provider,
        region=region,
        zone=zone,
        country=country,
        price=price,
        labels=labels,
    )
    words = [f"TREADLE_SHUTTLE_TOKEN={shlex.quote(token)}", "treadle", "shuttle", *options]
    return " ".join(words[:1] + [shlex.quote(word) for word in words[1:]])
