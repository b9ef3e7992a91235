"""Batch invoke (map) end to end: one request makes many executions, each item succeeds or
fails on its own, a retried batch makes nothing twice, and the results are gathered by page,
by waiting, and as they end over a WebSocket."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from integration.test_executions import register
from support.cluster import PYTHON, Cluster, eventually

pytestmark = pytest.mark.integration

# Doubles `n` into its result (fd 3), and exits with `code`.
_DOUBLER = (
    "import json, os\n"
    "args = json.load(open(os.environ['TREADLE_ARGS_FILE']))\n"
    "os.write(3, (json.dumps({'twice': args['n'] * 2}) + '\\n').encode())\n"
    "raise SystemExit(args.get('code', 0))\n"
)


def doubler(api: httpx.Client, name: str = "double", **extra: Any) -> None:
    register(
        api,
        name,
        [PYTHON, "main.py", "{n}"],
        source=_DOUBLER,
        source_name="main.py",
        resources={"cpu_millicores": 10, "memory_mib": 32},
        **extra,
    )


def submit(api: httpx.Client, name: str, body: dict[str, Any], **params: Any) -> httpx.Response:
    return api.post(f"/v1/functions/{name}/map", json=body, params=params)


def all_items(api: httpx.Client, batch_id: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.get(
            f"/v1/batches/{batch_id}", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items


def test_every_item_runs_and_its_result_comes_back_in_order(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api)
        made = submit(api, "double", {"items": [{"args": {"n": n}} for n in range(12)]})
        assert made.status_code == 202, made.text
        batch = made.json()
        assert batch["size"] == 12 and batch["id"].startswith("bt_")
        ids = [item["execution"]["id"] for item in batch["items"]]
        assert len(set(ids)) == 12
        items = all_items(api, batch["id"], wait=60, limit=5)
        assert [item["index"] for item in items] == list(range(12))
        assert [item["execution"]["result"] for item in items] == [
            {"twice": 2 * n} for n in range(12)
        ]
        assert {item["execution"]["state"] for item in items} == {"success"}
        assert [item["execution"]["id"] for item in items] == ids
        done = api.get(f"/v1/batches/{batch['id']}").json()
        assert done["done"] is True and done["counts"] == {"success": 12}
        # Each is an execution like any other.
        one = api.get(f"/v1/executions/{ids[3]}").json()
        assert one["args"] == {"n": 3} and one["result"] == {"twice": 6}


def test_a_bad_item_is_refused_alone_and_a_failing_one_fails_alone(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api, "double-mixed")
        items = [
            {"args": {"n": 1}},
            {"args": {}},  # the command's {n} placeholder has no value
            "not an object",
            {"args": {"n": 2}, "stdin": "a\x00b"},
            {"args": {"n": 3}, "unknown_field": True},
            {"args": {"n": 3}, "idempotency_key": "a\x00b"},
            {"args": {"n": 4, "code": 3}},  # runs, and fails with its exit code
            {"args": {"n": 5}},
        ]
        made = submit(api, "double-mixed", {"items": items}, wait=60)
        assert made.status_code == 200, made.text  # waited until every item ended
        batch = made.json()
        errors = {item["index"]: item["error"] for item in batch["items"] if item["error"]}
        assert sorted(errors) == [1, 2, 3, 4, 5]
        assert errors[1]["code"] == "invalid_request" and "n" in errors[1]["message"]
        assert {errors[i]["code"] for i in (2, 3, 4, 5)} == {"validation_error"}
        assert errors[2]["details"][0]["loc"][:3] == ["body", "items", 2]
        states = {
            item["index"]: (item["execution"]["state"], item["execution"]["exit_code"])
            for item in batch["items"]
            if item["execution"]
        }
        assert states == {0: ("success", 0), 6: ("failure", 3), 7: ("success", 0)}
        assert batch["counts"] == {"success": 2, "failure": 1, "refused": 5}
        assert batch["done"] is True


def test_a_retried_batch_makes_nothing_twice(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api, "double-retry")
        body = {
            "idempotency_key": "nightly-42",
            "items": [{"args": {"n": n}, "idempotency_key": f"item-{n}"} for n in range(4)],
        }
        first = submit(api, "double-retry", body)
        assert first.status_code == 202, first.text
        again = submit(api, "double-retry", body)
        assert again.status_code in (200, 202)
        assert again.json()["id"] == first.json()["id"]
        first_ids = [item["execution"]["id"] for item in first.json()["items"]]
        assert [item["execution"]["id"] for item in again.json()["items"]] == first_ids
        # Without the batch's key, the items' own keys answer with the executions made.
        renamed = submit(api, "double-retry", {"items": body["items"]}, wait=60)
        assert renamed.status_code == 200, renamed.text
        other = renamed.json()
        assert other["id"] != first.json()["id"]
        assert [item["execution"]["id"] for item in other["items"]] == first_ids
        assert all(item.get("reused") for item in other["items"])
        assert other["counts"] == {"success": 4}
        listed = api.get("/v1/executions", params={"function": "double-retry"}).json()["items"]
        assert sorted(e["id"] for e in listed) == sorted(first_ids)
        # One key twice in a batch: one execution answers both items.
        twice = submit(
            api,
            "double-retry",
            {"items": [{"args": {"n": 9}, "idempotency_key": "same"}] * 2},
            wait=60,
        ).json()
        a, b = (item["execution"] for item in twice["items"])
        assert a["id"] == b["id"] and a["result"] == {"twice": 18}
        assert twice["counts"] == {"success": 2} and twice["done"] is True


def test_results_stream_over_a_websocket_as_they_end(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api, "double-stream")
        items: list[Any] = [{"args": {"n": n}} for n in range(8)]
        items.insert(3, {"args": "not an object"})
        batch = submit(api, "double-stream", {"items": items}).json()
    url = cluster.url.replace("http", "ws", 1) + f"/v1/batches/{batch['id']}/results"
    headers = {"Authorization": f"Bearer {cluster.admin_key}"}
    with connect(url, additional_headers=headers, open_timeout=10) as ws:
        messages = [json.loads(raw) for raw in ws]
    end = messages[-1]
    assert end == {"type": "end", "counts": {"success": 8, "refused": 1}}
    assert {m["type"] for m in messages[:-1]} == {"results"}
    results = [item for m in messages[:-1] for item in m["items"]]
    assert sorted(m["index"] for m in results) == list(range(9))  # each once
    refused = [m for m in results if m["error"]]
    assert [m["index"] for m in refused] == [3]
    twice = {m["index"]: m["execution"]["result"]["twice"] for m in results if m["execution"]}
    assert twice == {i: 2 * (i if i < 3 else i - 1) for i in range(9) if i != 3}
    assert all(m["execution"]["state"] == "success" for m in results if m["execution"])


def test_a_batch_malformed_as_a_whole_is_refused_whole(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api, "double-whole")
        before = len(api.get("/v1/executions", params={"limit": 500}).json()["items"])
        cases = [
            ({"items": []}, 422),
            ({"items": {"args": {}}}, 422),
            ({"items": [{"args": {"n": 1}}], "idempotency_key": ""}, 422),
            ({"items": [{"args": {"n": 1}}], "extra": 1}, 422),
            ({"items": [{"args": {"n": 1}}], "idempotency_key": "a\x00b"}, 422),
            ({"items": [{"args": {"n": 1}}] * 10_001}, 413),
        ]
        for body, status in cases:
            answer = submit(api, "double-whole", body)
            assert answer.status_code == status, (
                body if len(str(body)) < 200 else status,
                answer.text,
            )
            assert "error" in answer.json()
        assert submit(api, "no-such-function", {"items": [{}]}).status_code == 404
        after = len(api.get("/v1/executions", params={"limit": 500}).json()["items"])
        assert after == before
        unauthenticated = httpx.post(
            f"{cluster.url}/v1/functions/double-whole/map", json={"items": [{"args": {"n": 1}}]}
        )
        assert unauthenticated.status_code == 401


def test_a_batch_is_its_tenants_alone_and_cursors_are_checked(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api, "double-mine")
        batch = submit(api, "double-mine", {"items": [{"args": {"n": 1}}] * 3}).json()
        page = api.get(f"/v1/batches/{batch['id']}", params={"limit": 2}).json()
        assert [item["index"] for item in page["items"]] == [0, 1]
        assert page["next_cursor"] is not None
        rest = api.get(
            f"/v1/batches/{batch['id']}", params={"cursor": page["next_cursor"], "limit": 2}
        ).json()
        assert [item["index"] for item in rest["items"]] == [2] and rest["next_cursor"] is None
        forged = base64.urlsafe_b64encode(b"ix_-5").decode()
        for cursor in ("nonsense", forged, base64.urlsafe_b64encode(b"ex_1").decode()):
            answer = api.get(f"/v1/batches/{batch['id']}", params={"cursor": cursor})
            assert answer.status_code == 422, answer.text
        assert api.get("/v1/batches/bt_none").status_code == 404
        made = api.post("/v1/tenants", json={"name": "batch-stranger"}).json()
    with cluster.client(made["api_key"]) as stranger:
        assert stranger.get(f"/v1/batches/{batch['id']}").status_code == 404


def test_the_sdk_maps_in_order_unordered_and_in_batches(cluster: Cluster) -> None:
    from treadle.client import AsyncClient, Client, TreadleAPIError

    with cluster.client() as api:
        doubler(api, "double-sdk")
    inputs = [{"n": n} for n in range(23)]
    with Client(cluster.url, cluster.admin_key) as client:
        double = client.function("double-sdk")
        ordered = list(double.map(inputs, batch_size=5))  # five batches
        assert [e["result"] for e in ordered] == [{"twice": 2 * n} for n in range(23)]
        assert [e["index"] for e in ordered] == list(range(23))
        assert len({e["id"] for e in ordered}) == 23
        unordered = list(double.map_unordered(iter(inputs[:7])))
        assert sorted(e["result"]["twice"] for e in unordered) == [2 * n for n in range(7)]
        assert all(e["result"]["twice"] == 2 * e["index"] for e in unordered)
        # A refused input raises, or is returned with `return_exceptions`.
        mixed = [{"n": 1}, {}, {"n": 2}]
        got = list(double.map(mixed, return_exceptions=True))
        assert got[0]["result"] == {"twice": 2} and got[2]["result"] == {"twice": 4}
        assert isinstance(got[1], TreadleAPIError) and got[1].status == 422
        with pytest.raises(TreadleAPIError):
            list(double.map(mixed))
        assert list(double.map([])) == []

    async def async_map() -> list[Any]:
        async with AsyncClient(cluster.url, cluster.admin_key) as client:
            return [e async for e in client.map("double-sdk", inputs[:6], batch_size=4)]

    import asyncio

    results = asyncio.run(async_map())
    assert [e["result"]["twice"] for e in results] == [0, 2, 4, 6, 8, 10]


def test_hostile_items_are_refused_alone_and_the_batch_stays_readable(cluster: Cluster) -> None:
    with cluster.client() as api:
        doubler(api, "double-hostile")
        many_fields = {"args": {"n": 1}, **{f"x{i}": 0 for i in range(20_000)}}
        # A lone surrogate: JSON parsing lets it through, UTF-8 cannot carry it.
        raw = (
            '{"items": [{"args": {"n": 1}}, {"args": {"n": 2}, "\\ud800": 1},'
            ' {"args": {"n": 3}, "idempotency_key": "\\udfff"}, ' + json.dumps(many_fields) + "]}"
        )
        made = api.post(
            "/v1/functions/double-hostile/map",
            params={"wait": 60},
            content=raw.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert made.status_code == 200, made.text
        batch = made.json()
        assert batch["items"][0]["execution"]["state"] == "success"
        refused = {item["index"]: item["error"] for item in batch["items"] if item["error"]}
        assert sorted(refused) == [1, 2, 3]
        assert {error["code"] for error in refused.values()} == {"validation_error"}
        assert len(refused[3]["details"]) <= 5  # 20,000 unknown fields, a few listed
        again = api.get(f"/v1/batches/{batch['id']}")
        assert again.status_code == 200 and again.json()["counts"]["refused"] == 3
        # A key of another function's batch is a conflict, not that batch.
        doubler(api, "double-other")
        first = submit(
            api, "double-hostile", {"items": [{"args": {"n": 1}}], "idempotency_key": "k"}
        )
        assert first.status_code == 202, first.text
        other = submit(api, "double-other", {"items": [{"args": {"n": 1}}], "idempotency_key": "k"})
        assert other.status_code == 409, other.text
        # A cursor whose digits are not ASCII ones.
        odd = base64.urlsafe_b64encode("ix_²".encode()).decode()
        assert api.get(f"/v1/batches/{batch['id']}", params={"cursor": odd}).status_code == 422


def test_a_tenant_holds_only_so_many_follow_sockets_at_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Past TREADLE_MAX_FOLLOWERS_PER_TENANT, a results (or output) socket is closed with
    4429 and a limit_exceeded body; one closed makes room for the next."""
    lone = Cluster(tmp_path_factory.mktemp("followers"))
    try:
        lone.start_weaver(max_followers_per_tenant="2")  # and no node: nothing ends
        with lone.client() as api:
            doubler(api, "stays-open")
            # One item waits for ever; the refused one is what an admitted socket sends first.
            items = [{"args": {"n": 1}}, {"args": "not an object"}]
            batch = submit(api, "stays-open", {"items": items}).json()
        url = lone.url.replace("http", "ws", 1) + f"/v1/batches/{batch['id']}/results"
        headers = {"Authorization": f"Bearer {lone.admin_key}"}

        def opened() -> Any:
            return connect(url, additional_headers=headers, open_timeout=10)

        with opened() as first, opened():
            with opened() as third:
                refusal = json.loads(third.recv(timeout=10))
                with pytest.raises(ConnectionClosed) as closed:
                    third.recv(timeout=10)
            assert refusal["error"]["code"] == "limit_exceeded"
            assert refusal["error"]["details"]["limit"] == "max_followers_per_tenant"
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
            assert json.loads(first.recv(timeout=10))["type"] == "results"
            first.close()

            def admitted() -> bool:  # once Weaver has seen the first one go
                with opened() as again:
                    return bool(json.loads(again.recv(timeout=10)).get("type") == "results")

            eventually(admitted, what="the first socket's place to be free")
    finally:
        lone.stop()
