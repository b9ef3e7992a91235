"""Bad input gets a clear 4xx with a JSON body naming what is wrong, and changes nothing."""

from __future__ import annotations

import httpx
import pytest

from support.cluster import Cluster

pytestmark = pytest.mark.integration


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    return dict(body["error"])


def test_unknown_function_is_404(cluster: Cluster) -> None:
    with cluster.client() as api:
        response = api.post("/v1/functions/nope/invoke", json={})
        assert response.status_code == 404
        assert error_of(response)["code"] == "not_found"
        assert "nope" in str(error_of(response)["message"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x"}, "command"),
        ({"name": "x", "command": "echo hi"}, "command"),
        ({"name": "Bad!", "command": ["x"]}, "name"),
        ({"name": "x", "command": ["x"], "timeout_s": -1}, "timeout_s"),
        ({"name": "x", "command": ["x"], "resources": {"memory_mib": "lots"}}, "resources"),
        ({"name": "x", "command": ["x"], "unknown": True}, "unknown"),
    ],
)
def test_malformed_function_is_422_naming_the_field(
    cluster: Cluster, body: dict[str, object], field: str
) -> None:
    with cluster.client() as api:
        response = api.post("/v1/functions", json=body)
        assert response.status_code == 422
        error = error_of(response)
        assert error["code"] == "validation_error"
        assert field in str(error["message"])
        assert api.get("/v1/functions/x").status_code == 404


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b"1", b"\xff\xfe", b'{"args": 5}', b'{"args": {}, "extra": 1}'],
)
def test_malformed_invoke_is_422(cluster: Cluster, content: bytes) -> None:
    with cluster.client() as api:
        api.post("/v1/functions", json={"name": "target", "command": ["/bin/true"]})
        before = len(api.get("/v1/executions", params={"function": "target"}).json()["items"])
        response = api.post("/v1/functions/target/invoke", content=content)
        assert response.status_code == 422, response.text
        assert error_of(response)["code"] == "validation_error"
        after = len(api.get("/v1/executions", params={"function": "target"}).json()["items"])
        assert after == before


def test_missing_placeholder_arg_is_422(cluster: Cluster) -> None:
    with cluster.client() as api:
        api.post("/v1/functions", json={"name": "greet", "command": ["/bin/echo", "{who}"]})
        response = api.post("/v1/functions/greet/invoke", json={"args": {}})
        assert response.status_code == 422
        assert "who" in str(error_of(response)["message"])


def test_oversized_args_are_413(cluster: Cluster) -> None:
    with cluster.client() as api:
        api.post("/v1/functions", json={"name": "big", "command": ["/bin/true"]})
        response = api.post("/v1/functions/big/invoke", json={"args": {"x": "a" * 300_000}})
        assert response.status_code == 413
        assert error_of(response)["code"] == "payload_too_large"
        too_big = api.post("/v1/functions/big/invoke", content=b"{" + b" " * 9_000_000 + b"}")
        assert too_big.status_code == 413


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/v1/executions", {"limit": 0}),
        ("GET", "/v1/executions", {"limit": "many"}),
        ("GET", "/v1/executions", {"state": "sleeping"}),
        ("GET", "/v1/executions", {"cursor": "!!!"}),
        ("POST", "/v1/functions/x/invoke", {"wait": -1}),
        ("POST", "/v1/functions/x/invoke", {"wait": 10_000}),
        ("GET", "/v1/functions/x", {"version": 0}),
    ],
)
def test_bad_query_parameters_are_422(
    cluster: Cluster, method: str, path: str, params: dict[str, object]
) -> None:
    with cluster.client() as api:
        response = api.request(method, path, params=params, json={} if method == "POST" else None)
        assert response.status_code == 422, response.text
        error_of(response)


def test_unknown_route_and_method_are_json(cluster: Cluster) -> None:
    with cluster.client() as api:
        assert error_of(api.get("/v1/nope"))["code"] == "not_found"
        response = api.put("/v1/functions")
        assert response.status_code == 405
        assert error_of(response)["code"] == "method_not_allowed"


def test_requests_without_a_valid_key_are_401(cluster: Cluster) -> None:
    for headers in ({}, {"Authorization": "Bearer tk_wrong"}, {"Authorization": "Basic x"}):
        response = httpx.get(f"{cluster.url}/v1/executions", headers=headers)
        assert response.status_code == 401
        assert error_of(response)["code"] == "unauthenticated"


def test_openapi_is_published(cluster: Cluster) -> None:
    spec = httpx.get(f"{cluster.url}/openapi.json").json()
    assert "/v1/functions/{name}/invoke" in spec["paths"]
    assert "/v1/executions/{execution_id}/cancel" in spec["paths"]


@pytest.mark.parametrize(
    "content",
    [
        b'{"args": {"t": "\\ud800"}}',
        b'{"args": {"x": NaN}}',
        b'{"args": {"x": 1e400}}',
        b'{"stdin": "\\udfff"}',
        b'{"args": {"x": -Infinity}}',
    ],
)
def test_values_json_cannot_carry_are_422_and_stored_nowhere(
    cluster: Cluster, content: bytes
) -> None:
    with cluster.client() as api:
        api.post("/v1/functions", json={"name": "strict", "command": ["/bin/true"]})
        response = api.post("/v1/functions/strict/invoke", content=content)
        assert response.status_code == 422, response.text
        assert error_of(response)["code"] == "validation_error"
        # nothing half-stored: listing still works and shows no execution of it
        listed = api.get("/v1/executions", params={"function": "strict"})
        assert listed.status_code == 200 and listed.json()["items"] == []


def test_function_with_unrepresentable_text_is_422(cluster: Cluster) -> None:
    with cluster.client() as api:
        body = b'{"name": "lone", "command": ["echo", "\\ud800"]}'
        response = api.post("/v1/functions", content=body)
        assert response.status_code == 422
        assert api.get("/v1/functions").status_code == 200
        assert api.get("/v1/functions/lone").status_code == 404


def test_out_of_range_version_is_422(cluster: Cluster) -> None:
    with cluster.client() as api:
        for path in ("/v1/functions/x?version=99999999999999999999",):
            assert api.get(path).status_code == 422
        response = api.post("/v1/functions/x/invoke?version=99999999999999999999", json={})
        assert response.status_code == 422


def test_out_of_range_output_cursor_is_refused(cluster: Cluster) -> None:
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    with cluster.client() as api:
        api.post("/v1/functions", json={"name": "cursor", "command": ["/bin/true"]})
        execution = api.post("/v1/functions/cursor/invoke", params={"wait": 30}).json()
        path = f"/v1/executions/{execution['id']}/output?after_seq=99999999999999999999"
        assert api.get(path).status_code == 422
    url = cluster.url.replace("http", "ws") + path
    with pytest.raises(InvalidStatus):  # refused at the handshake, not a broken socket
        ws_client.connect(url, additional_headers={"Authorization": f"Bearer {cluster.admin_key}"})
