"""Every query is tenant-scoped; other tenants' resources look exactly like missing ones."""

from __future__ import annotations

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import InvalidStatus

from support.cluster import Cluster

pytestmark = pytest.mark.integration


def test_tenant_b_cannot_see_or_touch_tenant_a(cluster: Cluster) -> None:
    with cluster.client() as admin:
        created = admin.post("/v1/tenants", json={"name": "tenant-b"})
        assert created.status_code == 201, created.text
        key_b = created.json()["api_key"]
        admin.post("/v1/functions", json={"name": "secret", "command": ["/bin/sleep", "30"]})
        execution = admin.post("/v1/functions/secret/invoke", json={}).json()

    with cluster.client(key_b) as b:
        for response in (
            b.get(f"/v1/executions/{execution['id']}"),
            b.get(f"/v1/executions/{execution['id']}/output"),
            b.post(f"/v1/executions/{execution['id']}/cancel"),
            b.get("/v1/functions/secret"),
            b.post("/v1/functions/secret/invoke", json={}),
        ):
            assert response.status_code == 404, response.text
        assert b.get("/v1/executions").json()["items"] == []
        assert b.get("/v1/functions").json()["items"] == []
        # not an admin: the fleet and tenants are not theirs to see
        assert b.get("/v1/nodes").status_code == 403
        assert b.post("/v1/tenants", json={"name": "c"}).status_code == 403
        # following another tenant's output is refused too
        url = cluster.url.replace("http", "ws") + f"/v1/executions/{execution['id']}/output"
        with ws_client.connect(url, additional_headers={"Authorization": f"Bearer {key_b}"}) as ws:
            message = ws.recv(timeout=10)
            assert "not_found" in str(message)

    with cluster.client() as admin:
        still = admin.get(f"/v1/executions/{execution['id']}").json()
        assert still["state"] in ("open", "running")
        admin.post(f"/v1/executions/{execution['id']}/cancel")


def test_same_function_name_in_two_tenants_is_two_functions(cluster: Cluster) -> None:
    with cluster.client() as admin:
        key_c = admin.post("/v1/tenants", json={"name": "tenant-c"}).json()["api_key"]
        admin.post("/v1/functions", json={"name": "shared-name", "command": ["/bin/echo", "a"]})
    cluster.allow_process_tier("tenant-c")  # the cluster's node offers only that tier
    with cluster.client(key_c) as c:
        created = c.post(
            "/v1/functions", json={"name": "shared-name", "command": ["/bin/echo", "c"]}
        )
        assert created.status_code == 201 and created.json()["version"] == 1
        execution = c.post("/v1/functions/shared-name/invoke", params={"wait": 60}).json()
        assert c.get(f"/v1/executions/{execution['id']}/output").json()["stdout"] == "c\n"


@pytest.mark.parametrize("token", [None, "tj_wrong", "nd_x:wrong-secret"])
def test_agent_connection_without_valid_token_is_refused(
    cluster: Cluster, token: str | None
) -> None:
    url = cluster.url.replace("http", "ws") + "/v1/agent"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as info:
        ws_client.connect(url, additional_headers=headers, open_timeout=10)
    assert info.value.response.status_code == 403


def test_agent_with_join_token_is_accepted(cluster: Cluster) -> None:
    url = cluster.url.replace("http", "ws") + "/v1/agent"
    with ws_client.connect(
        url, additional_headers={"Authorization": f"Bearer {cluster.join_token}"}
    ) as ws:
        ws.send('{"type": "heartbeat"}')  # not a hello: the handshake is refused
        with pytest.raises(Exception):  # noqa: B017
            ws.recv(timeout=10)
    assert httpx.get(f"{cluster.url}/healthz").status_code == 200
