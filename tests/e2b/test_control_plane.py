"""E2B's control plane served by Weaver, driven by the stock `e2b` SDK (2.63 and 2.50, sync and
async): create, get_info, list, set_timeout, pause and connect, kill, is_running, tenancy
and bad input. What the SDK reports is checked against treadle's own API."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from e2b.programs import SDK
from support.cluster import Cluster, eventually

pytestmark = pytest.mark.integration


def treadle(cluster: Cluster, sandbox_id: str) -> dict[str, Any]:
    """The sandbox as treadle's own API shows it (E2B ids are treadle's without `sbx_`)."""
    with cluster.client() as api:
        response = api.get(f"/v1/sandboxes/sbx_{sandbox_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_create_reads_back_what_it_was_given_and_kill_ends_it(sdk: SDK) -> None:
    tag = uuid.uuid4().hex
    seen = sdk.run(
        f"""
        sbx = await w(S.create(template="base", metadata={{"run": "{tag}"}},
                               envs={{"GREETING": "hello there"}}, timeout=120))
        info = await w(sbx.get_info())
        by_id = await w(S.get_info(sbx.sandbox_id))
        seen = dict(id=sbx.sandbox_id, domain=sbx.sandbox_domain, host=sbx.get_host(8080),
            template=info.template_id, metadata=info.metadata, state=str(info.state.value),
            started=info.started_at.isoformat(), end=info.end_at.isoformat(),
            envd=info.envd_version, same=by_id.sandbox_id == sbx.sandbox_id,
            running=await w(sbx.is_running()))
        # Some CPU, then its metrics: one per usage record (every 5 s while it runs),
        # until one ends after the burn, so the records seen cover it.
        await w(sbx.commands.run("timeout 0.5 sh -c 'while :; do :; done' || true"))
        import time
        after = time.time()
        metrics = []
        for _ in range(300):
            metrics = await w(sbx.get_metrics())
            if metrics and metrics[-1].timestamp.timestamp() > after:
                break
            await asyncio.sleep(0.05)
        out(**seen, metrics=[{{"cpus": m.cpu_count, "pct": m.cpu_used_pct, "mem": m.mem_used,
                              "total": m.mem_total, "disk": m.disk_total}}
                             for m in metrics])
        """
    )
    sandbox_id = seen["id"]
    assert seen["domain"] == sdk.cluster.url.removeprefix("http://")
    assert seen["host"] == f"8080-{sandbox_id}.{seen['domain']}"
    assert (seen["template"], seen["metadata"], seen["state"]) == ("base", {"run": tag}, "running")
    assert when(seen["end"]) - when(seen["started"]) == timedelta(seconds=120)
    assert seen["envd"] == "0.5.7" and seen["same"] is True
    assert seen["running"] is True
    assert seen["metrics"], "no metrics within 15 s"
    for metric in seen["metrics"]:
        assert (metric["cpus"], metric["total"], metric["disk"]) == (1, 256 * 2**20, 2**30)
        assert 0 < metric["mem"] < metric["total"] and 0 <= metric["pct"] <= 100
    assert any(metric["pct"] > 0 for metric in seen["metrics"])

    own = treadle(sdk.cluster, sandbox_id)
    assert own["timeout_s"] == 120 and own["network"] is True
    assert own["metadata"] == {"run": tag, "e2b.template": "base"}
    with sdk.cluster.client() as api:
        echoed = api.post(f"/v1/sandboxes/{own['id']}/exec", json={"cmd": "echo $GREETING"})
        assert echoed.json()["stdout"] == "hello there\n", echoed.text

    gone = sdk.run(
        f"""
        sbx = await w(S.connect("{sandbox_id}"))
        first = await w(sbx.kill())
        again = await w(S.kill("{sandbox_id}"))
        out(first=first, again=again, running=await w(sbx.is_running()),
            info=await failure(lambda: S.get_info("{sandbox_id}")),
            timeout=await failure(lambda: S.set_timeout("{sandbox_id}", 60)),
            connect=await failure(lambda: S.connect("{sandbox_id}")))
        """
    )
    assert (gone["first"], gone["again"], gone["running"]) == (True, False, False)
    for call in ("info", "timeout", "connect"):
        assert gone[call]["type"] == "SandboxNotFoundException", gone
    assert treadle(sdk.cluster, sandbox_id)["desired"] == "stopped"


def test_list_filters_by_metadata_and_state_and_pages(sdk: SDK) -> None:
    tag = uuid.uuid4().hex
    seen = sdk.run(
        f"""
        # A value the SDK must quote: the filter is one encoded query value.
        wanted = {{"batch": "{tag}", "odd/key:1": "a&b=c d %"}}
        ids = [(await w(S.create(metadata=wanted, timeout=300))).sandbox_id for _ in range(3)]
        await w(S.create(metadata={{"batch": "{tag}-other"}}, timeout=300))
        paused = ids[0]
        await w(S.pause(paused))

        async def pages(**query):
            paginator = S.list(query=SandboxQuery(metadata=wanted, **query), limit=2)
            found = []
            while paginator.has_next:
                found.append([s.sandbox_id for s in await w(paginator.next_items())])
            return found

        out(ids=ids, paused=paused, all=await pages(),
            running=await pages(state=[SandboxState.RUNNING]),
            only_paused=await pages(state=[SandboxState.PAUSED]),
            states={{s.sandbox_id: str(s.state.value)
                    for s in await w(S.list(query=SandboxQuery(metadata=wanted)).next_items())}})
        """
    )
    ids, paused = seen["ids"], seen["paused"]
    # Newest first, two a page: three sandboxes are two pages.
    assert seen["all"] == [ids[:0:-1], ids[:1]]
    assert seen["running"] == [ids[:0:-1]]
    assert seen["only_paused"] == [[paused]]
    assert seen["states"] == {paused: "paused", ids[1]: "running", ids[2]: "running"}
    assert treadle(sdk.cluster, paused)["status"] == "paused"
    with sdk.cluster.client() as api:
        for item in api.get("/v1/sandboxes", params={"metadata": f"batch:{tag}"}).json()["items"]:
            api.delete(f"/v1/sandboxes/{item['id']}")


def test_set_timeout_moves_the_end_both_ways(sdk: SDK) -> None:
    seen = sdk.run(
        """
        sbx = await w(S.create(timeout=300))
        first = (await w(sbx.get_info())).end_at
        await w(sbx.set_timeout(3600))
        later = (await w(sbx.get_info())).end_at
        await w(S.set_timeout(sbx.sandbox_id, 60))
        sooner = (await w(sbx.get_info())).end_at
        await w(sbx.kill())
        out(id=sbx.sandbox_id, first=first.isoformat(), later=later.isoformat(),
            sooner=sooner.isoformat())
        """
    )
    assert when(seen["first"]) < when(seen["later"])
    assert when(seen["sooner"]) < when(seen["first"])


def test_pause_then_connect_resumes(sdk: SDK) -> None:
    seen = sdk.run(
        """
        sbx = await w(S.create(timeout=300))
        paused = await w(sbx.pause())
        state = (await w(S.get_info(sbx.sandbox_id))).state.value
        again = await w(sbx.pause())
        running_while_paused = await w(sbx.is_running())
        out(id=sbx.sandbox_id, paused=paused, state=str(state), again=again,
            running_while_paused=running_while_paused)
        """
    )
    sandbox_id = seen["id"]
    assert (seen["paused"], seen["state"], seen["again"]) == (True, "paused", False)
    assert seen["running_while_paused"] is False
    assert treadle(sdk.cluster, sandbox_id)["status"] == "paused"

    resumed = sdk.run(
        f"""
        sbx = await w(S.connect("{sandbox_id}", timeout=200))
        info = await w(sbx.get_info())
        out(state=str(info.state.value), running=await w(sbx.is_running()),
            seconds=(info.end_at - info.started_at).total_seconds(), killed=await w(sbx.kill()))
        """
    )
    assert (resumed["state"], resumed["running"], resumed["killed"]) == ("running", True, True)
    own = treadle(sdk.cluster, sandbox_id)
    assert own["desired"] == "stopped" and own["status"] in ("running", "stopping", "stopped")


def test_another_tenant_finds_nothing(sdk: SDK, other_key: str) -> None:
    created = sdk.run("out(id=(await w(S.create(timeout=300))).sandbox_id)")
    sandbox_id = created["id"]
    seen = sdk.run(
        f"""
        out(info=await failure(lambda: S.get_info("{sandbox_id}")),
            kill=await failure(lambda: S.kill("{sandbox_id}")),
            timeout=await failure(lambda: S.set_timeout("{sandbox_id}", 60)),
            pause=await failure(lambda: S.pause("{sandbox_id}")),
            connect=await failure(lambda: S.connect("{sandbox_id}")),
            listed=[s.sandbox_id for s in await w(S.list().next_items())])
        """,
        key=other_key,
    )
    for call in ("info", "timeout", "pause", "connect"):
        assert seen[call]["type"] == "SandboxNotFoundException", seen
    assert seen["kill"] == {"type": None, "result": "False"}
    assert sandbox_id not in seen["listed"]
    assert treadle(sdk.cluster, sandbox_id)["desired"] == "running"
    sdk.run(f'await w(S.kill("{sandbox_id}")); out()')


def test_bad_input_is_the_sdk_s_error_and_never_a_5xx(sdk: SDK) -> None:
    seen = sdk.run(
        """
        out(negative=await failure(lambda: S.create(timeout=-1)),
            huge=await failure(lambda: S.create(timeout=10**9)),
            template=await failure(lambda: S.create(template="no-such-template")),
            env=await failure(lambda: S.create(envs={"1BAD": "x"})),
            metadata=await failure(lambda: S.create(metadata={"k": "v" * 513})),
            limit=await failure(lambda: S.list(limit=1000).next_items()),
            unknown=await failure(lambda: S.get_info("nosuchsandbox")))
        """
    )
    for case in ("negative", "huge", "template", "env", "metadata", "limit"):
        assert seen[case]["type"] == "SandboxException", (case, seen[case])
        assert seen[case]["message"].startswith("400: "), (case, seen[case])
    assert "no-such-template" in seen["template"]["message"]
    assert "envVars" in seen["env"]["message"]
    assert seen["unknown"]["type"] == "SandboxNotFoundException"


@pytest.mark.parametrize(
    ("method", "path", "body", "params"),
    [
        ("POST", "/v2/sandboxes", {"templateID": "base", "timeout": -1}, None),
        ("POST", "/v2/sandboxes", '{"templateID": "base", "timeout": 1e400}', None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "timeout": "soon"}, None),
        ("POST", "/sandboxes", {"templateID": "nope"}, None),
        ("POST", "/sandboxes", {}, None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "metadata": {"": "x"}}, None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "metadata": {"k" * 65: "x"}}, None),
        (
            "POST",
            "/v2/sandboxes",
            {"templateID": "base", "metadata": {f"k{i}": "v" for i in range(64)}},
            None,
        ),
        ("POST", "/v2/sandboxes", {"templateID": "base", "metadata": {"e2b.template": "x"}}, None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "envVars": {"TREADLE_X": "1"}}, None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "envVars": {"A": 1}}, None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "volumeMounts": [{"name": "v"}]}, None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "autoResume": {"enabled": True}}, None),
        ("POST", "/v2/sandboxes", "not json", None),
        ("GET", "/v2/sandboxes", None, {"limit": "0"}),
        ("GET", "/v2/sandboxes", None, {"limit": "101"}),
        ("GET", "/v2/sandboxes", None, {"nextToken": "garbage!"}),
        ("GET", "/v2/sandboxes", None, {"state": "stopped"}),
        ("GET", "/v2/sandboxes", None, {"metadata": "no-equals-sign"}),
        ("GET", "/v2/sandboxes", None, {"startedAfter": "yesterday"}),
        ("GET", "/v2/sandboxes", None, {"order": "asc"}),
    ],
)
def test_bad_requests_are_400_in_e2b_s_shape(
    raw: httpx.Client, method: str, path: str, body: Any, params: dict[str, str] | None
) -> None:
    # A string is sent as it is: JSON Python's parser reads as infinity, or no JSON at all.
    raw_body = {"content": body} if isinstance(body, str) else {"json": body}
    response = raw.request(method, path, params=params, **raw_body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == 400 and answer["message"], answer


def test_errors_for_ids_keys_and_states(raw: httpx.Client, e2b_cluster: Cluster) -> None:
    created = raw.post("/v2/sandboxes", json={"templateID": "base"})
    assert created.status_code == 201, created.text
    sandbox = created.json()
    assert set(sandbox) >= {"sandboxID", "templateID", "clientID", "envdVersion", "domain"}
    sid = sandbox["sandboxID"]

    for path in ("/sandboxes/nope", "/sandboxes/Not-An-Id", "/sandboxes/sbx_nope/metrics"):
        missing = raw.get(path)
        assert missing.status_code == 404 and missing.json()["code"] == 404, missing.text
    for query in ("start=-1", "end=abc", f"start={10**12}"):
        bad = raw.get(f"/sandboxes/{sid}/metrics?{query}")
        assert bad.status_code == 400 and bad.json()["code"] == 400, (query, bad.text)
    assert raw.get(f"/sandboxes/{sid}/metrics?start=0&end=1").json() == []
    assert raw.delete("/sandboxes/nope").json() == {
        "code": 404,
        "message": "sandbox 'nope' not found",
    }
    unauthenticated = httpx.get(f"{e2b_cluster.url}/sandboxes/{sid}")
    assert unauthenticated.status_code == 401 and unauthenticated.json()["code"] == 401
    wrong = httpx.get(f"{e2b_cluster.url}/sandboxes/{sid}", headers={"X-API-Key": "tk_wrong"})
    assert wrong.status_code == 401, wrong.text
    # Still running: resume is for paused sandboxes (e2b < 2.6).
    assert raw.post(f"/sandboxes/{sid}/resume", json={"timeout": 60}).status_code == 409
    assert raw.post(f"/sandboxes/{sid}/refreshes", json={"duration": 60}).status_code == 204
    assert raw.post(f"/sandboxes/{sid}/timeout", json={"timeout": 0}).status_code == 400
    listed = raw.get("/sandboxes")
    assert listed.status_code == 200 and sid in [s["sandboxID"] for s in listed.json()]
    unsupported = raw.put(f"/sandboxes/{sid}/network", json={})
    assert unsupported.status_code == 501 and "not supported" in unsupported.json()["message"]
    assert raw.get("/snapshots").status_code == 501

    # envd's /health, as is_running() asks it: the sandbox's own token opens it.
    envd = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
    token = {"X-Access-Token": sandbox["envdAccessToken"]}
    assert httpx.get(f"{e2b_cluster.url}/health", headers={**envd, **token}).status_code == 204
    stranger = httpx.get(
        f"{e2b_cluster.url}/health", headers={**envd, "X-Access-Token": "sbt_wrong"}
    )
    assert stranger.status_code == 502 and "was not found" in stranger.json()["message"]
    assert httpx.get(f"{e2b_cluster.url}/health", headers=envd).status_code == 401

    assert raw.delete(f"/sandboxes/{sid}").status_code == 204
    assert raw.delete(f"/sandboxes/{sid}").status_code == 404
    after = httpx.get(f"{e2b_cluster.url}/health", headers={**envd, **token})
    assert after.status_code == 502 and "was not found" in after.json()["message"]


def test_on_each_store_a_process_tier_sandbox_lists_and_refuses_to_pause(cluster: Cluster) -> None:
    """The suite's shared cluster (SQLite and PostgreSQL), whose only tier is process."""
    with httpx.Client(
        base_url=cluster.url, timeout=60, headers={"X-API-Key": cluster.admin_key}
    ) as raw:
        tag = uuid.uuid4().hex
        body = {"templateID": "base", "metadata": {"tag": tag}, "allow_internet_access": False}
        ids = []
        for _ in range(3):
            created = raw.post("/sandboxes", json=body)
            assert created.status_code == 201, created.text
            ids.append(created.json()["sandboxID"])
        pages, token = [], None
        while True:
            params = {"metadata": f"tag={tag}", "limit": "2"}
            listed = raw.get("/v2/sandboxes", params={**params, "nextToken": token or ""})
            assert listed.status_code == 200, listed.text
            pages.append([item["sandboxID"] for item in listed.json()])
            token = listed.headers.get("X-Next-Token")
            if token is None:
                break
        assert pages == [ids[:0:-1], ids[:1]]

        eventually(
            lambda: treadle(cluster, ids[0])["status"] == "running",
            what="the sandbox to run",
        )
        refused = raw.post(f"/sandboxes/{ids[0]}/pause", json={})
        assert refused.status_code == 400, refused.text
        assert "cannot be paused" in refused.json()["message"]
        assert raw.get(f"/sandboxes/{ids[0]}").json()["state"] == "running"
        for sandbox_id in ids:
            assert raw.delete(f"/sandboxes/{sandbox_id}").status_code == 204
