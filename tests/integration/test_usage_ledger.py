"""The usage ledger: a node's usage records are stored once each and priced by Weaver, and an
execution's cost is the sum of its records', at the node's price as billed (its spot price).
A record sent twice counts once; a record for a workload the node does not hold, or outside
the workload's life, counts for nothing; each is acknowledged so the node stops sending it."""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from websockets.sync import client as ws_client

from conftest import STORES, store_settings
from integration.test_executions import register, run
from integration.test_hostile_input import FakeNode, ended, start
from support.cgroups import cpu_s, groups_of
from support.cluster import PYTHON, Cluster, eventually
from treadle.protocol import (
    UsageAck,
    UsageKey,
    UsageRecord,
    UsageReport,
    encode,
)
from treadle.weaver.store.database import sync_url

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=STORES)
def priced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A node that lists at $36/h and is billed at its spot price of $3.60/h, with 2 cores:
    a 1-core execution holds half of it. Once on each store."""
    cluster = Cluster(tmp_path_factory.mktemp("ledger"))
    settings = store_settings(request)
    DATABASES[id(cluster)] = settings.get("database_url") or (
        f"sqlite:///{cluster.home / 'treadle.db'}"
    )
    try:
        cluster.start_weaver(node_down_after_s="120", **settings)
        cluster.start_shuttle(
            "priced", "--price", "36", "--spot", "--spot-price", "3.6", "--cpu", "2000"
        )
        yield cluster
    finally:
        cluster.stop()


# The store of each cluster the tests started, by the cluster's id.
DATABASES: dict[int, str] = {}


def ledger(cluster: Cluster, workload_id: str) -> list[Any]:
    url = DATABASES.get(id(cluster), f"sqlite:///{cluster.home / 'treadle.db'}")
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.text("SELECT * FROM usage_records WHERE workload_id = :id ORDER BY seq"),
                    {"id": workload_id},
                )
            )
    finally:
        engine.dispose()


def test_an_execution_costs_what_its_records_say_at_its_node_s_price(priced: Cluster) -> None:
    with priced.client() as api:
        sleep = [PYTHON, "-c", "import time; time.sleep(0.3)"]
        register(api, "metered-sleep", sleep, placement={"spot": True})
        execution = run(api, "metered-sleep")
        assert execution["state"] == "success"
        found = eventually(lambda: api.get(f"/v1/executions/{execution['id']}").json()["cost"])
    (record,) = ledger(priced, execution["id"])
    assert (record.kind, record.generation, record.seq, record.final) == ("execution", 1, 1, True)
    assert 0.3 <= record.wall_s < 30 and record.cpu_s > 0
    # The spot price, for half of the node, for the time it ran.
    assert (record.price_per_hour, record.share) == (3.6, 0.5)
    assert math.isclose(record.cost, 3.6 * 0.5 * record.wall_s / 3600, rel_tol=1e-9)
    assert math.isclose(found, record.cost, rel_tol=1e-9)


@pytest.fixture
def node(priced: Cluster) -> Iterator[FakeNode]:
    url = priced.url.replace("http", "ws") + "/v1/agent"
    headers = {"Authorization": f"Bearer {priced.join_token}"}
    with ws_client.connect(url, additional_headers=headers) as ws:
        # $3,600 an hour for 4 cores: a 1-core execution holds a quarter, 25 cents a second.
        yield FakeNode(ws, cpu_millicores=4000, price_per_hour=3600.0)


def record(spec: Any, seq: int, wall: float, **fields: Any) -> UsageRecord:
    now = time.time()
    return UsageRecord(
        kind="execution",
        id=spec.id,
        generation=spec.attempt,
        seq=seq,
        start=now - wall,
        end=now,
        wall_s=wall,
        **fields,
    )


def acked(node: FakeNode, records: list[UsageRecord]) -> list[UsageKey]:
    node.send(encode(UsageReport(records=records)))
    message = node.receive(lambda m: isinstance(m, UsageAck))
    assert isinstance(message, UsageAck)
    return list(message.keys)


def test_a_record_sent_again_counts_once(priced: Cluster, node: FakeNode) -> None:
    with priced.client() as api:
        (spec,) = start(api, node, "ledger-once", 1)
        first, second = record(spec, 1, 10.0, cpu_s=1.0), record(spec, 2, 20.0)
        assert len(acked(node, [first])) == 1
        # A reconnect's replay: both again, the first a second time.
        keys = acked(node, [first, second])
        assert [(k.id, k.seq) for k in keys] == [(spec.id, 1), (spec.id, 2)]
        assert len(acked(node, [second])) == 1
        rows = ledger(priced, spec.id)
        assert [(r.seq, r.share, r.cost) for r in rows] == [(1, 0.25, 2.5), (2, 0.25, 5.0)]
        cost = api.get(f"/v1/executions/{spec.id}").json()["cost"]
        assert math.isclose(cost, 7.5)  # 10 s and 20 s at 25 cents, each once


def test_records_a_node_may_not_make_count_for_nothing(priced: Cluster, node: FakeNode) -> None:
    with priced.client() as api:
        (spec,) = start(api, node, "ledger-lies", 1)
        other = run_elsewhere(api)
        lies = [
            # another node's execution
            record(type("S", (), {"id": other, "attempt": 1})(), 1, 1.0),
            # an attempt it does not hold
            UsageRecord(**{**record(spec, 1, 1.0).model_dump(), "generation": 7}),
            # from before the execution was
            UsageRecord(**{**record(spec, 2, 1.0).model_dump(), "start": 1000.0, "end": 1001.0}),
            # from an hour ahead of Weaver's clock
            UsageRecord(
                **{
                    **record(spec, 3, 1.0).model_dump(),
                    "start": time.time() + 3600,
                    "end": time.time() + 3601,
                }
            ),
        ]
        keys = acked(node, lies)
        assert len(keys) == 4  # the node is told to stop sending them all
        assert ledger(priced, spec.id) == []
        assert len(ledger(priced, other)) == 1  # its own node's record alone
        node.send(encode_exited(spec))
        assert ended(api, spec)["cost"] is None


def run_elsewhere(api: Any) -> str:
    register(api, "ledger-elsewhere", [PYTHON, "-c", "pass"], placement={"spot": True})
    execution = run(api, "ledger-elsewhere")
    return str(execution["id"])


def encode_exited(spec: Any) -> str:
    import json

    from integration.test_hostile_input import exited

    return json.dumps(exited(spec))


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A namespace-tier node ($3,600 an hour for 4 cores and 4 GiB) that records a running
    sandbox's usage every half second."""
    cluster = Cluster(tmp_path_factory.mktemp("ledger-sandboxes"))
    try:
        cluster.start_weaver(process_tier=False)
        cluster.start_shuttle(
            "isolated",
            "--runtime",
            "namespace",
            "--price",
            "3600",
            "--cpu",
            "4000",
            "--memory",
            "4096",
            "--usage-interval",
            "0.5",
            "--allow-network",
        )
        yield cluster
    finally:
        cluster.stop()


def test_a_sandbox_s_records_add_up_to_its_life_and_pause_costs_memory_only(
    isolated: Cluster,
) -> None:
    from treadle.client import Client, Sandbox

    with Client(url=isolated.url, api_key=isolated.admin_key) as client:
        sandbox = Sandbox.create(
            client=client, resources={"cpu_millicores": 2000, "memory_mib": 512}, timeout=300
        )
        sandbox.wait_for_status("running", timeout=60)
        burn = (
            "import time; t = time.process_time(); exec('while time.process_time() - t < 1: pass')"
        )
        assert sandbox.run(["python3", "-c", burn]).exit_code == 0
        eventually(
            lambda: sum(r.cpu_s for r in ledger(isolated, sandbox.id)) >= 1.0,
            timeout=30,
            what="the CPU second to be recorded",
        )
        sandbox.pause()
        sandbox.wait_for_status("paused", timeout=30)
        eventually(
            lambda: sum(r.paused_s for r in ledger(isolated, sandbox.id)) >= 1.0,
            timeout=30,
            what="a paused second to be recorded",
        )
        sandbox.resume()
        sandbox.wait_for_status("running", timeout=30)
        sandbox.kill()
        rows = eventually(
            lambda: (rows := ledger(isolated, sandbox.id)) and rows[-1].final and rows,
            timeout=30,
            what="its last record",
        )
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))  # none missing, none twice
    for before, after in itertools.pairwise(rows):
        assert after.start == pytest.approx(before.end)  # intervals that meet: its whole life
    cpu = sum(r.cpu_s for r in rows)
    assert 1.0 <= cpu < sum(r.wall_s for r in rows) * 4
    assert max(r.memory_peak_mib for r in rows) > 1
    # 2 of 4 cores: half the node while it runs, 512 MiB of 4 GiB (an eighth) while paused.
    assert {r.share for r in rows} == {0.5}
    for r in rows:
        expected = 3600 * 0.5 * (r.wall_s - r.paused_s) / 3600 + 3600 * 0.125 * r.paused_s / 3600
        assert math.isclose(r.cost, expected, rel_tol=1e-9, abs_tol=1e-12)
    assert sum(r.paused_s for r in rows) >= 1.0


# Reads 4 MiB of the largest program on the host past the page cache (O_DIRECT), so that the
# disk is read whatever the cache holds; sends 100 datagrams of 1,000 bytes out of its
# network interface, and prints the bytes that interface says it sent (a busy host's tap
# queue may drop some of them, which are then nobody's traffic).
_IO = """
import mmap, os, socket
programs = (os.path.join("/usr/bin", name) for name in os.listdir("/usr/bin"))
largest = max(programs, key=lambda p: os.path.getsize(p) if os.path.isfile(p) else 0)
fd = os.open(largest, os.O_RDONLY | os.O_DIRECT)
buffer = mmap.mmap(-1, 1 << 20)
print(sum(os.preadv(fd, [buffer], i << 20) for i in range(4)))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(100):
    udp.sendto(b"x" * 1000, ("10.0.2.3", 9))
def sent():
    with open("/proc/net/dev") as f:
        return next(int(l.split(":")[1].split()[8]) for l in f if l.strip().startswith("tap0:"))
# Until the gateway's address is resolved the kernel holds the datagrams back: wait for them
# to leave (or 10 s), as a test of what was counted, not of how fast slirp answers ARP.
import time
deadline = time.monotonic() + 10
while sent() < 10 * 1000 and time.monotonic() < deadline:
    time.sleep(0.05)
print(sent())
"""


def test_a_sandbox_s_cpu_disk_and_network_are_its_counters_summed(isolated: Cluster) -> None:
    from treadle.client import Client, Sandbox

    before = groups_of(isolated.root / "isolated")
    with Client(url=isolated.url, api_key=isolated.admin_key) as client:
        sandbox = Sandbox.create(client=client, network=True, timeout=300)
        sandbox.wait_for_status("running", timeout=60)
        (group,) = groups_of(isolated.root / "isolated") - before
        done = sandbox.run(["python3", "-c", _IO])
        read, sent = done.stdout.split()
        assert (done.exit_code, read) == (0, str(4 << 20)), done.stderr
        assert int(sent) >= 10 * 1000  # most datagrams left, whatever the queue dropped
        # Frozen, its counter stands still: once a record ends after it was read, the
        # records hold all of it.
        sandbox.pause()
        sandbox.wait_for_status("paused", timeout=30)
        counted = cpu_s(group)
        read_at = time.time()
        rows = eventually(
            lambda: (rows := ledger(isolated, sandbox.id)) and rows[-1].end > read_at and rows,
            timeout=30,
            what="a record after the pause",
        )
        sandbox.kill()
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert math.isclose(sum(r.cpu_s for r in rows), counted, abs_tol=1e-6)
    assert sum(r.disk_read_bytes for r in rows) >= 4 << 20
    assert sum(r.net_out_bytes for r in rows) >= int(sent)
    assert all(r.disk_write_bytes >= 0 and r.net_in_bytes >= 0 for r in rows)


def test_usage_sums_the_ledger_per_group_for_its_tenant_alone(priced: Cluster) -> None:
    with priced.client() as api:
        register(api, "usage-a", [PYTHON, "-c", "pass"], placement={"spot": True})
        register(api, "usage-b", [PYTHON, "-c", "pass"], placement={"spot": True})
        ran = [run(api, "usage-a"), run(api, "usage-a"), run(api, "usage-b")]
        for execution in ran:
            eventually(lambda e=execution: ledger(priced, e["id"]), what="its record")
        summary = api.get(
            "/v1/usage", params={"group_by": "function,day", "kind": "execution"}
        ).json()
        by_function = {g["key"]["function"]: g for g in summary["groups"]}
        assert by_function["usage-a"]["records"] == 2 and by_function["usage-b"]["records"] == 1
        rows = [row for e in ran for row in ledger(priced, e["id"])]
        a_cost = sum(r.cost for e, r in zip(ran, rows, strict=True) if e["function"] == "usage-a")
        assert math.isclose(by_function["usage-a"]["cost"], a_cost, rel_tol=1e-6)
        assert by_function["usage-a"]["key"]["day"].endswith("T00:00:00Z")
        everything = api.get("/v1/usage").json()["totals"]
        assert everything["records"] >= 3
        assert everything["cost"] >= summary["totals"]["cost"] * (1 - 1e-9)
        only_a = api.get("/v1/usage", params={"function": "usage-a"}).json()["totals"]
        assert only_a["records"] == 2

        # A sandbox's metadata labels its usage: filtered and grouped by.
        created = api.post(
            "/v1/sandboxes",
            json={
                "metadata": {"team": "blue"},
                "isolation": "process",
                "placement": {"spot": True},
            },
        )
        assert created.status_code == 201, created.text
        labelled = created.json()
        eventually(
            lambda: api.get(f"/v1/sandboxes/{labelled['id']}").json()["status"] == "running",
            what="the sandbox to run",
        )
        assert api.delete(f"/v1/sandboxes/{labelled['id']}").status_code < 300
        rows = eventually(
            lambda: (rows := ledger(priced, labelled["id"])) and rows[-1].final and rows,
            what="the sandbox's last record",
        )
        by_team = api.get(
            "/v1/usage", params={"label": "team=blue", "group_by": "label:team,sandbox"}
        ).json()
        assert by_team["groups"] == [
            {**by_team["groups"][0], "key": {"label:team": "blue", "sandbox": labelled["id"]}}
        ]
        assert by_team["totals"]["records"] == len(rows)
        assert math.isclose(by_team["totals"]["cpu_s"], sum(r.cpu_s for r in rows), abs_tol=1e-9)
        from typer.testing import CliRunner

        from treadle.cli.main import app
        from treadle.client import Client

        with Client(url=priced.url, api_key=priced.admin_key) as client:
            sdk = client.usage(labels={"team": "blue"}, group_by=["label:team"])
        assert sdk["groups"] == [{**sdk["groups"][0], "key": {"label:team": "blue"}}]
        assert sdk["totals"]["records"] == len(rows)
        base = ["--url", priced.url, "--api-key", priced.admin_key, "usage"]
        table = CliRunner().invoke(app, [*base, "--label", "team=blue", "--by", "label:team"])
        assert table.exit_code == 0, table.output
        assert "LABEL:TEAM" in table.output and "blue" in table.output
        assert CliRunner().invoke(app, [*base, "--label", "team"]).exit_code == 2
        none = api.get("/v1/usage", params={"label": "team=red"}).json()["totals"]
        assert none["records"] == 0
        by_any = api.get("/v1/usage", params={"group_by": "label:team"}).json()["groups"]
        assert {g["key"]["label:team"] for g in by_any} >= {"blue", None}  # None: executions
        for bad in ("team", "=blue", "odd key'\"=x", f"{'k' * 65}=v", f"team={'v' * 513}"):
            refused = api.get("/v1/usage", params={"label": bad})
            assert refused.status_code == 422, (bad, refused.text)
        for bad_group in ("label:", "label:odd key", "a,b,c,d,e"):
            refused = api.get("/v1/usage", params={"group_by": bad_group})
            assert refused.status_code == 422, (bad_group, refused.text)

        other = api.post("/v1/tenants", json={"name": "usage-other"}).json()["api_key"]
        tenant_id = api.get(f"/v1/executions/{ran[0]['id']}").json()["tenant_id"]
    with priced.client(other) as stranger:
        assert stranger.get("/v1/usage").json()["totals"]["records"] == 0
        refused = stranger.get("/v1/usage", params={"tenant": tenant_id})
        assert refused.status_code == 403
        for bad in ({"group_by": "colour"}, {"from": "yesterday"}, {"from": "2030-01-01"}):
            assert stranger.get("/v1/usage", params=bad).status_code == 422, bad


def test_a_long_execution_is_metered_while_it_runs(isolated: Cluster) -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    with isolated.client() as api:
        register(api, "long-burn", ["python3", "-c", burn])
        execution = run(api, "long-burn")
        assert execution["state"] == "success"
        rows = eventually(
            lambda: (rows := ledger(isolated, execution["id"])) and rows[-1].final and rows,
            what="its last record",
        )
        cost = api.get(f"/v1/executions/{execution['id']}").json()["cost"]
    # Every half second while it ran, then its last: numbered, meeting, adding up.
    assert len(rows) >= 3 and [r.seq for r in rows] == list(range(1, len(rows) + 1))
    for earlier, later in itertools.pairwise(rows):
        assert later.start == pytest.approx(earlier.end)
    assert [r.final for r in rows] == [False] * (len(rows) - 1) + [True]
    assert sum(r.cpu_s for r in rows) >= 1.5
    assert sum(r.cpu_s for r in rows[:-1]) > 0  # measured while it ran, not only at its end
    assert math.isclose(cost, sum(r.cost for r in rows), rel_tol=1e-9)


# nvidia-smi cannot run without an NVIDIA GPU: this stand-in answers the two queries Shuttle
# makes, in nvidia-smi's CSV format, for one device half busy and holding 1,024 MiB.
_NVIDIA_SMI = """#!/bin/sh
case "$1" in
--query-gpu=index,uuid,name,memory.total) echo "0, GPU-5e1f, NVIDIA H100 80GB HBM3, 81559" ;;
--query-gpu=uuid,utilization.gpu,memory.used) echo "GPU-5e1f, 50, 1024" ;;
*) echo "unexpected query: $*" >&2; exit 2 ;;
esac
"""


@pytest.fixture(scope="module")
def with_gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A node with one (stood-in) NVIDIA device, metering every 0.3 s, and a node that
    meters nothing."""
    root = tmp_path_factory.mktemp("ledger-gpu")
    tools = root / "tools"
    tools.mkdir()
    (tools / "nvidia-smi").write_text(_NVIDIA_SMI)
    (tools / "nvidia-smi").chmod(0o755)
    cluster = Cluster(root)
    cluster.env["PATH"] = f"{tools}:{cluster.env.get('PATH', os.environ['PATH'])}"
    try:
        cluster.start_weaver()
        cluster.start_shuttle("gpu", "--usage-interval", "0.3", "--label", "metering=on")
        cluster.start_shuttle("unmetered", "--no-metering", "--label", "metering=off")
        yield cluster
    finally:
        cluster.stop()


def test_an_execution_s_gpu_use_is_read_from_its_devices(with_gpu: Cluster) -> None:
    wait = "import time; time.sleep(1)"
    with with_gpu.client() as api:
        # Both nodes see the stand-in device: the metered one is asked for.
        metered = {"labels": {"metering": "on"}}
        register(api, "on-gpu", [PYTHON, "-c", wait], resources={"gpu_count": 1}, placement=metered)
        register(api, "no-gpu", [PYTHON, "-c", "pass"], placement=metered)
        on_gpu, no_gpu = run(api, "on-gpu"), run(api, "no-gpu")
        assert (on_gpu["state"], no_gpu["state"]) == ("success", "success")
        rows = eventually(
            lambda: (rows := ledger(with_gpu, on_gpu["id"])) and rows[-1].final and rows,
            what="its last record",
        )
        plain = eventually(lambda: ledger(with_gpu, no_gpu["id"]), what="the other's record")
    # Half of one device over every interval it ran, and what the device held.
    assert len(rows) >= 3
    running = sum(r.wall_s - r.paused_s for r in rows)
    assert math.isclose(sum(r.gpu_s for r in rows), 0.5 * running, rel_tol=1e-6)
    assert {r.gpu_memory_peak_mib for r in rows} == {1024}
    assert [(r.gpu_s, r.gpu_memory_peak_mib) for r in plain] == [(0, 0)] * len(plain)


def test_a_node_that_does_not_meter_records_nothing(with_gpu: Cluster) -> None:
    placement = {"labels": {"metering": "off"}}
    with with_gpu.client() as api:
        register(api, "unmetered", [PYTHON, "-c", "pass"], placement=placement)
        done = run(api, "unmetered")
    # A record would have come before the exit, on the same link: stored by now.
    assert done["state"] == "success" and done["cost"] is None
    assert ledger(with_gpu, done["id"]) == []
    assert not (with_gpu.root / "unmetered" / "usage.journal").exists()
