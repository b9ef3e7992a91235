"""Weaver's Prometheus metrics, scraped and parsed as Prometheus would: what the store holds,
what was dispatched, requests by route template, for an admin only, and no tenant's data in
any label."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration.test_executions import register, run
from support.cluster import PYTHON, Cluster, free_port

pytestmark = pytest.mark.integration


def scrape(cluster: Cluster) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with cluster.client() as admin:
        answer = admin.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def test_metrics_count_what_the_store_holds_and_what_happened(cluster: Cluster) -> None:
    before = scrape(cluster)
    with cluster.client() as api:
        register(api, "metered-echo", [PYTHON, "-c", "print('private-output-7f3a')"])
        executions = [run(api, "metered-echo") for _ in range(3)]
    assert all(e["state"] == "success" for e in executions)
    after = scrape(cluster)

    succeeded = (("state", "success"),)
    was = before.get("treadle_executions", {}).get(succeeded, 0)
    assert after["treadle_executions"][succeeded] == was + 3
    dispatched = after["treadle_dispatched_executions_total"][()]
    assert dispatched - before.get("treadle_dispatched_executions_total", {}).get((), 0) >= 3
    assert after["treadle_dispatch_latency_seconds_count"][()] >= 3
    assert after["treadle_dispatch_queue_depth"][()] >= 0
    # Each execution's usage record, stored: how long after its end.
    stored = after["treadle_usage_record_delay_seconds_count"][()]
    assert stored - before.get("treadle_usage_record_delay_seconds_count", {}).get((), 0) >= 3
    assert after["treadle_nodes"][(("state", "connected"),)] == 1

    invoke = (
        ("method", "POST"),
        ("route", "/v1/functions/{name}/invoke"),
        ("status", "200"),
    )
    assert after["treadle_http_requests_total"][invoke] >= 3
    timed = (("method", "POST"), ("route", "/v1/functions/{name}/invoke"))
    assert after["treadle_http_request_duration_seconds_count"][timed] >= 3


def test_labels_hold_no_tenant_data(cluster: Cluster) -> None:
    with cluster.client() as api:
        register(api, "secret-name-91c2", [PYTHON, "-c", "print(1)"])
        execution = run(api, "secret-name-91c2")
        api.get(f"/v1/executions/{execution['id']}")
    with cluster.client() as admin:
        text = admin.get("/metrics").text
    for private in ("secret-name-91c2", execution["id"], execution["tenant_id"]):
        assert private not in text


def test_metrics_are_for_an_admin(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as anyone:
        assert anyone.get("/metrics").status_code == 401
    with cluster.client() as admin:
        key = admin.post("/v1/tenants", json={"name": "metrics-tenant"}).json()["api_key"]
    with cluster.client(key) as tenant:
        assert tenant.get("/metrics").status_code == 403


def test_a_shuttle_serves_its_own_metrics(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver()
        port = free_port()
        cluster.start_shuttle("metered", "--metrics-addr", f"127.0.0.1:{port}")
        with cluster.client() as api:
            register(api, "noisy", [PYTHON, "-c", "print('x' * 999)"])
            assert run(api, "noisy")["state"] == "success"
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert samples[("treadle_shuttle_link_connected", ())] == 1
        assert samples[("treadle_shuttle_link_connects_total", ())] >= 1
        assert samples[("treadle_shuttle_spawn_seconds_count", (("tier", "process"),))] == 1
        assert samples[("treadle_shuttle_output_bytes_total", (("stream", "stdout"),))] == 1000
        assert "noisy" not in text
    finally:
        cluster.stop()
