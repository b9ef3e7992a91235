"""Which tier work runs in: the process tier only for tenants an admin allows it, and a
function that names no tier in the weakest isolating tier its node offers.

The Weaver here runs with the production defaults (no `default_min_isolation`, the admin's
tenant not allowed the process tier), unlike the other suites' clusters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import STORES, store_settings
from support.cluster import PYTHON, Cluster, eventually
from support.runtimes import shuttle_settings
from treadle.client import AsyncClient, Client, TreadleAPIError
from treadle.domain.resources import Tier
from treadle.shuttle.runtimes import available_runtimes

pytestmark = pytest.mark.integration

# In the host's user namespace uid 0 maps the whole range; a sandbox maps one id.
UID_MAP = [PYTHON, "-c", "print(open('/proc/self/uid_map').read().split())"]
HOST_UID_MAP = "['0', '0', '4294967295']"


@pytest.fixture(scope="module", params=STORES)
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A `plain` node offering only the process tier and a `boxed` one offering process and
    namespace."""
    if Tier.NAMESPACE not in available_runtimes(shuttle_settings(Path("/nonexistent"))):
        pytest.skip("needs the namespace tier (bubblewrap)")
    c = Cluster(tmp_path_factory.mktemp("tiers"))
    try:
        c.start_weaver(process_tier=False, **store_settings(request))
        c.start_shuttle("plain")
        c.start_shuttle("boxed", "--runtime", "process", "--runtime", "namespace")
        yield c
    finally:
        c.stop()


@pytest.fixture
def tenant(fleet: Cluster) -> Iterator[tuple[str, str]]:
    """A new tenant, not allowed the process tier: (its id, its key)."""
    with fleet.client() as admin:
        count = len(admin.get("/v1/tenants").json()["items"])
        created = admin.post("/v1/tenants", json={"name": f"tenant-{count}"})
        assert created.status_code == 201, created.text
    yield created.json()["tenant"]["id"], created.json()["api_key"]


def _run(api: httpx.Client, name: str) -> dict[str, Any]:
    answer = api.post(f"/v1/functions/{name}/invoke", params={"wait": 60}, json={})
    assert answer.status_code == 200, answer.text
    execution = dict(answer.json())
    assert execution["state"] == "success", execution
    return execution


def _stdout(api: httpx.Client, execution: dict[str, Any]) -> str:
    return str(api.get(f"/v1/executions/{execution['id']}/output").json()["stdout"])


def _node(fleet: Cluster, execution: dict[str, Any]) -> str:
    node = fleet.node_named("boxed")
    assert node is not None
    return "boxed" if execution["node_id"] == node["id"] else "plain"


@pytest.mark.parametrize("field", ["isolation", "min_isolation"])
def test_a_tenant_not_allowed_cannot_name_the_process_tier(
    fleet: Cluster, tenant: tuple[str, str], field: str
) -> None:
    _, key = tenant
    with fleet.client(key) as api:
        refused = api.post(
            "/v1/functions", json={"name": "raw", "command": ["/bin/true"], field: "process"}
        )
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "tier_not_allowed"
        assert api.get("/v1/functions/raw").status_code == 404
        stronger = api.post(
            "/v1/functions", json={"name": "boxed", "command": ["/bin/true"], field: "namespace"}
        )
        assert stronger.status_code == 201, stronger.text


def test_the_admins_own_tenant_is_not_allowed_by_default(fleet: Cluster) -> None:
    with fleet.client() as admin:
        tenants = {t["name"]: t for t in admin.get("/v1/tenants").json()["items"]}
        assert tenants["default"]["allow_process_tier"] is False
        refused = admin.post(
            "/v1/functions", json={"name": "raw", "command": ["/bin/true"], "isolation": "process"}
        )
        assert refused.status_code == 403, refused.text


def test_an_allowed_tenant_runs_in_the_process_tier(
    fleet: Cluster, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    allowed = fleet.allow_process_tier(tenant_id)
    assert allowed["allow_process_tier"] is True
    with fleet.client(key) as api:
        created = api.post(
            "/v1/functions", json={"name": "raw", "command": UID_MAP, "isolation": "process"}
        )
        assert created.status_code == 201, created.text
        execution = _run(api, "raw")
        assert execution["isolation"] == "process"
        assert _stdout(api, execution).strip() == HOST_UID_MAP


def test_a_tenant_not_allowed_never_lands_on_the_process_tier(
    fleet: Cluster, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    with fleet.client(key) as api:
        api.post("/v1/functions", json={"name": "who", "command": UID_MAP})
        for _ in range(6):
            execution = _run(api, "who")
            assert (execution["isolation"], _node(fleet, execution)) == ("namespace", "boxed")
            assert _stdout(api, execution).strip() != HOST_UID_MAP


def test_an_allowed_tenant_also_runs_isolated_unless_it_names_the_process_tier(
    fleet: Cluster, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    fleet.allow_process_tier(tenant_id)
    with fleet.client(key) as api:
        for name, tier in (
            ("raw", {"isolation": "process"}),
            ("either", {"min_isolation": "process"}),
            ("who", {}),
        ):
            created = api.post("/v1/functions", json={"name": name, "command": UID_MAP, **tier})
            assert created.status_code == 201, created.text
        # An exact tier waits for the permission to be seen; a minimum would take an
        # isolating tier meanwhile, which satisfies it too.
        assert _run(api, "raw")["isolation"] == "process"
        assert _run(api, "either")["isolation"] == "process"
        execution = _run(api, "who")
        assert (execution["isolation"], _node(fleet, execution)) == ("namespace", "boxed")


def test_work_of_a_tenant_whose_permission_is_withdrawn_waits_until_it_is_given_back(
    fleet: Cluster, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    fleet.allow_process_tier(tenant_id)
    with fleet.client(key) as api:
        api.post(
            "/v1/functions", json={"name": "raw", "command": ["/bin/true"], "isolation": "process"}
        )
        _run(api, "raw")  # placement has seen the permission: what it knows is now stale
        fleet.allow_process_tier(tenant_id, allowed=False)
        execution = api.post("/v1/functions/raw/invoke", json={}).json()

        def reason() -> str | None:
            current = api.get(f"/v1/executions/{execution['id']}").json()
            assert current["state"] == "open", current
            return current.get("pending_reason")

        assert "not allowed" in eventually(reason, what="the refusal to show")
        fleet.allow_process_tier(tenant_id)

        def ended() -> dict[str, Any] | None:
            current = dict(api.get(f"/v1/executions/{execution['id']}").json())
            return current if current["state"] not in ("open", "running") else None

        done = eventually(ended, what="the execution to run once allowed again")
        assert (done["state"], done["isolation"]) == ("success", "process")


async def test_the_sdk_reads_and_sets_the_permission(
    fleet: Cluster, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    raw = {"name": "raw", "command": ["/bin/true"], "isolation": "process"}
    with Client(fleet.url, key) as client:
        with pytest.raises(TreadleAPIError) as refused:
            client.create_function(raw)
        assert (refused.value.status, refused.value.code) == (403, "tier_not_allowed")
        async with AsyncClient(fleet.url, fleet.admin_key) as admin:
            assert (await admin.get_tenant(tenant_id))["allow_process_tier"] is False
            updated = await admin.update_tenant(tenant_id, allow_process_tier=True)
            assert updated["allow_process_tier"] is True
            listed = {t["id"]: t for t in (await admin.tenants())["items"]}
            assert listed[tenant_id]["allow_process_tier"] is True
        assert client.create_function(raw)["isolation"] == "process"


def test_tenant_routes_need_an_admin_and_answer_bad_input_with_4xx(
    fleet: Cluster, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    with fleet.client(key) as api:
        assert api.get("/v1/tenants").status_code == 403
        forbidden = api.patch(f"/v1/tenants/{tenant_id}", json={"allow_process_tier": True})
        assert forbidden.status_code == 403
    with fleet.client() as admin:
        assert admin.get(f"/v1/tenants/{tenant_id}").json()["allow_process_tier"] is False
        missing = admin.patch("/v1/tenants/tn_missing", json={"allow_process_tier": True})
        assert missing.status_code == 404
        for body in ({}, {"allow_process_tier": "yes"}, {"allow_process_tier": True, "x": 1}):
            answer = admin.patch(f"/v1/tenants/{tenant_id}", json=body)
            assert answer.status_code == 422, (body, answer.text)
        assert admin.get(f"/v1/tenants/{tenant_id}").json()["allow_process_tier"] is False


def test_the_operator_raises_the_default_tier_for_functions_that_name_none(
    tmp_path: Path,
) -> None:
    offered = available_runtimes(shuttle_settings(Path("/nonexistent")))
    if not {Tier.NAMESPACE, Tier.OCI} <= set(offered):
        pytest.skip("needs the namespace and oci tiers (bubblewrap, crun or runc)")
    c = Cluster(tmp_path)
    try:
        c.start_weaver(process_tier=False, default_min_isolation="oci")
        c.start_shuttle("both", "--runtime", "namespace", "--runtime", "oci")
        with c.client() as api:
            api.post("/v1/functions", json={"name": "plain", "command": ["/bin/true"]})
            api.post(
                "/v1/functions",
                json={"name": "light", "command": ["/bin/true"], "min_isolation": "namespace"},
            )
            assert _run(api, "plain")["isolation"] == "oci"
            assert _run(api, "light")["isolation"] == "namespace"
    finally:
        c.stop()
