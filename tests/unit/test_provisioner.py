"""The provisioner starts one node per offer for work that waits, stays within its budget,
and cools an offer down after a failed start: with the real `local` provider, whose Shuttles
here dial an address where no Weaver listens (so they never join)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import Fleet, Offer, Provision, Request, place
from treadle.weaver.providers.local import LocalProvider
from treadle.weaver.services.nodes import NodeRegistry
from treadle.weaver.services.provisioner import Provisioner


class Tokens:
    """Join tokens without a database: what the provisioner asks of the auth service."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    async def issue_join_token(self, ttl_s: float) -> str:
        self.issued.append(f"tj_{len(self.issued)}")
        return self.issued[-1]


def _offer(name: str, price: float) -> Offer:
    return Offer(
        provider="local",
        instance_type=name,
        region="eu-west",
        cpu_millicores=2000,
        memory_mib=2048,
        price_per_hour=price,
        runtimes=frozenset({Tier.PROCESS}),
    )


async def _round(provisioner: Provisioner, request: Request) -> str:
    """What one dispatcher round does for one waiting execution."""
    result = place(request, Fleet(), provisioner.offers())
    assert isinstance(result, Provision), result
    reason = provisioner.want(result)
    await asyncio.gather(*list(provisioner._starts))
    return reason


@pytest.fixture
def provider(tmp_path: Path) -> LocalProvider:
    return LocalProvider(
        "local", [_offer("small", 0.1), _offer("large", 0.4)], home_root=tmp_path / "nodes"
    )


def _provisioner(provider: LocalProvider, budget: float | None) -> Provisioner:
    return Provisioner(
        [provider],
        auth=Tokens(),  # type: ignore[arg-type]
        registry=NodeRegistry(on_change=lambda: None),
        nodes=None,  # type: ignore[arg-type]
        weaver_urls=["http://127.0.0.1:9"],
        budget_per_hour=budget,
        scale_down_after_s=60,
        join_timeout_s=60,
        on_joined=lambda: None,
    )


async def test_work_waiting_for_a_node_starts_one_not_one_per_offer(
    provider: LocalProvider,
) -> None:
    provisioner = _provisioner(provider, budget=None)
    request = Request(resources=Resources(cpu_millicores=500), strategy="lowest_cost")
    try:
        reasons = [await _round(provisioner, request) for _ in range(4)]
        running = await provider.instances()
        assert [i.offer for i in running] == ["local/small/eu-west"]
        assert all("being started: local/small/eu-west" in r for r in reasons)
        assert provisioner.spend_per_hour() == pytest.approx(0.1)
    finally:
        await provisioner.stop()
    assert await provider.instances() == []


async def test_an_offer_over_the_budget_is_refused(provider: LocalProvider) -> None:
    provisioner = _provisioner(provider, budget=0.05)
    request = Request(resources=Resources(cpu_millicores=500), strategy="lowest_cost")
    try:
        assert provisioner.offers() == []
        result = place(request, Fleet(), [_offer("small", 0.1)])
        assert isinstance(result, Provision)
        assert "fleet budget" in provisioner.want(result)
        assert await provider.instances() == []
    finally:
        await provisioner.stop()


async def test_a_failed_start_cools_the_offer_down(tmp_path: Path) -> None:
    broken = LocalProvider(
        "local", [_offer("small", 0.1)], home_root=tmp_path / "nodes", python="/nonexistent"
    )
    provisioner = _provisioner(broken, budget=None)
    request = Request(resources=Resources(cpu_millicores=500), strategy="lowest_cost")
    try:
        await _round(provisioner, request)
        assert provisioner.offers() == []  # cooling down: not tried again at once
        assert await broken.instances() == []
    finally:
        await provisioner.stop()
