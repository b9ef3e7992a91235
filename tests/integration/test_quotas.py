"""A tenant's quotas and budget, set by an admin: new work past a quota, or once the budget is
spent, is refused with a 429 naming the limit and the use; a hard budget, once spent, stops the
tenant's running sandboxes and cancels its executions; a soft one refuses new work only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.test_executions import register, run
from support.cluster import PYTHON, Cluster, eventually
from treadle.domain.errors import LimitExceeded
from treadle.domain.function import FunctionSpec
from treadle.domain.quotas import TenantLimits
from treadle.domain.resources import Resources
from treadle.weaver.core import Weaver
from treadle.weaver.services.executions import InvokeRequest
from treadle.weaver.settings import WeaverSettings
from treadle.weaver.store.writer import Tx

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A node at $36,000 an hour for 2 cores: a second of a 1-core sandbox costs $5."""
    made = Cluster(tmp_path_factory.mktemp("quotas"))
    try:
        made.start_weaver()
        made.start_shuttle("dear", "--price", "36000", "--cpu", "2000", "--usage-interval", "0.3")
        yield made
    finally:
        made.stop()


def tenant(cluster: Cluster, name: str) -> tuple[str, httpx.Client]:
    with cluster.client() as admin:
        made = admin.post("/v1/tenants", json={"name": name}).json()
        tenant_id = made["tenant"]["id"]
        admin.patch(f"/v1/tenants/{tenant_id}", json={"allow_process_tier": True})
    return tenant_id, cluster.client(made["api_key"])


def limit(cluster: Cluster, tenant_id: str, **limits: object) -> dict[str, object]:
    with cluster.client() as admin:
        answer = admin.put(f"/v1/tenants/{tenant_id}/limits", json=limits)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_work_past_a_quota_is_refused_naming_the_limit_and_the_use(cluster: Cluster) -> None:
    tenant_id, api = tenant(cluster, "quota-cpu")
    with api:
        limit(cluster, tenant_id, cpu_millicores=1500, sandboxes=1)
        first = api.post("/v1/sandboxes", json={"resources": {"cpu_millicores": 1000}})
        assert first.status_code == 201, first.text
        refused = api.post("/v1/sandboxes", json={"resources": {"cpu_millicores": 1000}})
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "limit_exceeded"
        assert error["details"]["limit"] in ("cpu_millicores", "sandboxes")
        assert error["details"]["in_use"] == (
            1000 if error["details"]["limit"] == "cpu_millicores" else 1
        )
        register(api, "big", [PYTHON, "-c", "pass"], resources={"cpu_millicores": 1000})
        invoked = api.post("/v1/functions/big/invoke", json={})
        assert invoked.status_code == 429
        assert "cpu_millicores quota is 1500" in invoked.json()["error"]["message"]
        # What the tenant holds, as the admin reads it.
        with cluster.client() as admin:
            shown = admin.get(f"/v1/tenants/{tenant_id}/limits").json()
        assert shown["in_use"]["cpu_millicores"] == 1000 and shown["in_use"]["sandboxes"] == 1
        assert api.delete(f"/v1/sandboxes/{first.json()['id']}").status_code in (200, 202)
    with cluster.client() as admin:
        assert admin.put("/v1/tenants/tn_none/limits", json={}).status_code == 404
        bad = admin.put(f"/v1/tenants/{tenant_id}/limits", json={"budget": -1})
        assert bad.status_code == 422
    other, stranger = tenant(cluster, "quota-stranger")
    with stranger:
        assert stranger.put(f"/v1/tenants/{other}/limits", json={}).status_code == 403


def test_a_hard_budget_spent_stops_running_work_and_refuses_more(cluster: Cluster) -> None:
    tenant_id, api = tenant(cluster, "budget-hard")
    with api:
        limit(cluster, tenant_id, budget=3.0, period="day", hard=True)
        sandbox = api.post("/v1/sandboxes", json={"isolation": "process"}).json()
        # $5 a second: the budget is spent within the first record or two.
        eventually(
            lambda: api.get(f"/v1/sandboxes/{sandbox['id']}").json()["status"] == "stopped",
            timeout=60,
            what="the sandbox stopped by the budget",
        )
        assert api.get(f"/v1/sandboxes/{sandbox['id']}").json()["end_reason"] == "budget_exceeded"
        refused = api.post("/v1/sandboxes", json={"isolation": "process"})
        assert refused.status_code == 429
        details = refused.json()["error"]["details"]
        assert details["limit"] == "budget" and details["spent"] >= 3.0
        register(api, "after", [PYTHON, "-c", "pass"])
        assert api.post("/v1/functions/after/invoke", json={}).status_code == 429


def test_a_soft_budget_refuses_new_work_and_leaves_running_work(cluster: Cluster) -> None:
    tenant_id, api = tenant(cluster, "budget-soft")
    with api:
        register(api, "cheap", [PYTHON, "-c", "import time; time.sleep(0.4)"])
        assert run(api, "cheap")["state"] == "success"  # spends about $1
        sandbox = api.post("/v1/sandboxes", json={"isolation": "process"}).json()
        limit(cluster, tenant_id, budget=0.01, period="month", hard=False)
        refused = api.post("/v1/functions/cheap/invoke", json={})
        assert refused.status_code == 429
        assert refused.json()["error"]["details"]["limit"] == "budget"
        # Still running: a soft budget only refuses what is new.
        assert api.get(f"/v1/sandboxes/{sandbox['id']}").json()["desired"] == "running"
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_a_batch_past_a_quota_runs_the_items_that_fit_and_refuses_the_rest(
    cluster: Cluster,
) -> None:
    tenant_id, api = tenant(cluster, "quota-batch")
    with api:
        limit(cluster, tenant_id, cpu_millicores=1000)
        register(api, "tenth", [PYTHON, "-c", "pass"], resources={"cpu_millicores": 400})
        items = [{"args": {}} for _ in range(5)]
        made = api.post("/v1/functions/tenth/map", params={"wait": 60}, json={"items": items})
        assert made.status_code == 200, made.text
        batch = made.json()
        ran = [item["index"] for item in batch["items"] if item["execution"]]
        assert ran == [0, 1]
        refused = [item["error"] for item in batch["items"] if item["error"]]
        assert len(refused) == 3
        assert {error["code"] for error in refused} == {"limit_exceeded"}
        assert refused[0]["details"]["limit"] == "cpu_millicores"
        assert batch["counts"] == {"success": 2, "refused": 3}


def test_requests_at_once_are_admitted_one_after_another_within_the_quota(
    cluster: Cluster,
) -> None:
    """Each admission counts what the ones before it stored: of invokes and batches sent
    together, no more run than the quota holds."""
    tenant_id, api = tenant(cluster, "quota-at-once")
    with api:
        limit(cluster, tenant_id, cpu_millicores=1000)
        register(
            api,
            "hold",
            [PYTHON, "-c", "import time; time.sleep(60)"],
            resources={"cpu_millicores": 250},
        )
        key = api.headers["Authorization"]

        async def at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(
                base_url=str(api.base_url), headers={"Authorization": key}, timeout=60
            ) as client:
                invokes = [client.post("/v1/functions/hold/invoke", json={}) for _ in range(6)]
                batches = [
                    client.post("/v1/functions/hold/map", json={"items": [{}, {}]})
                    for _ in range(3)
                ]
                return list(await asyncio.gather(*invokes, *batches))

        answers = asyncio.run(at_once())
        invoked = [a for a in answers[:6] if a.status_code == 202]
        assert {a.status_code for a in answers[:6]} <= {202, 429}
        mapped = [a.json() for a in answers[6:]]
        ran = [item["execution"]["id"] for b in mapped for item in b["items"] if item["execution"]]
        # 1,000 millicores hold four of 250, whoever asked first.
        assert len(invoked) + len(ran) == 4
        held = [a.json()["id"] for a in invoked] + ran
        for execution_id in held:
            api.post(f"/v1/executions/{execution_id}/cancel")


async def test_a_cancelled_invoke_keeps_its_tenants_admission_until_its_write_is_decided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled (its client gone) while its execution's write is queued: the write
    still lands, so the tenant's next admission must not read its use before it does."""
    weaver = Weaver(WeaverSettings(home=tmp_path / "weaver"))
    await weaver.start()
    try:
        made, _ = await weaver.auth.create_tenant("hasty")
        tenant_id = made["id"]
        await weaver.quotas.set_limits(tenant_id, TenantLimits(cpu_millicores=1000))
        one_core = Resources(cpu_millicores=1000, memory_mib=64)
        spec = FunctionSpec(name="f", command=["true"], resources=one_core)
        await weaver.functions.create(tenant_id, spec)

        # The writer held busy, so what is submitted next waits in its queue.
        gate = asyncio.Event()

        async def busy(_tx: Tx) -> None:
            await gate.wait()

        held = weaver.writer.submit(busy)
        submitted: list[object] = []
        queued = [asyncio.Event(), asyncio.Event()]
        submit = weaver.writer.submit

        def watched(fn: Any) -> asyncio.Future[Any]:
            submitted.append(fn)
            queued[min(len(submitted), 2) - 1].set()
            return submit(fn)

        waiting = asyncio.Event()

        class Turn(asyncio.Lock):
            """The tenant's turn, saying when an admission has to wait for it."""

            async def acquire(self) -> bool:
                if self.locked():
                    waiting.set()
                return await super().acquire()

        turn = Turn()
        monkeypatch.setattr(weaver.writer, "submit", watched)
        monkeypatch.setattr(weaver.quotas, "_turn", lambda _tenant: turn)

        def invoke() -> asyncio.Task[Any]:
            return asyncio.create_task(weaver.invoke(tenant_id, "f", InvokeRequest(), None, None))

        first = invoke()
        await queued[0].wait()  # admitted: its write queued
        first.cancel()
        second = invoke()
        # Until the second either waits for the tenant's turn or has a write of its own queued.
        either = [asyncio.ensure_future(event.wait()) for event in (waiting, queued[1])]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        for pending in either:
            pending.cancel()
        gate.set()
        await held
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(LimitExceeded):
            await second
        assert len(submitted) == 1
        assert (await weaver.quotas.in_use(tenant_id)).cpu_millicores == 1000
    finally:
        await weaver.stop()
