"""The microvm tier through treadle's API: a node started with `--microvm` offers it, a
function asking for it runs in a VM of its own (its kernel, not the host's), and so does a
sandbox, exec'd into through the API like any other. The node keeps a warm pool: a start
of a shape it saw before takes a VM booted ahead, and its metrics say so."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration.test_executions import output, register, run
from support.cluster import Cluster, eventually, free_port
from treadle.client import Client, Sandbox

pytestmark = [pytest.mark.integration, pytest.mark.microvm]


WARM_MIB = 2048
METRICS_PORT = free_port()


def pool_metrics() -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
    return {
        name + "".join(sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if (name := sample.name).startswith("treadle_shuttle_warm_pool")
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, package: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("microvm-api"))
    try:
        cluster.start_weaver(process_tier=False)
        tiers = ("--runtime", "namespace", "--runtime", "microvm", "--microvm")
        pool = ("--microvm-warm", "1", "--microvm-warm-mib", str(WARM_MIB))
        metrics = ("--metrics-addr", f"127.0.0.1:{METRICS_PORT}")
        cluster.start_shuttle("vm0", *tiers, *pool, *metrics, "--cpu", "4000", "--memory", "4096")
        yield cluster
    finally:
        cluster.stop()


def test_the_node_offers_the_tier_and_a_function_runs_in_its_own_vm(cluster: Cluster) -> None:
    with cluster.client() as api:
        node = api.get("/v1/nodes").json()["items"][0]
        assert "microvm" in node["runtimes"]
        # How its VMs run, chosen by a real boot: software emulation on this kind of host.
        assert node["labels"]["microvm-accel"] in ("kvm", "tcg")
        register(
            api,
            "in-a-vm",
            ["sh", "-c", 'echo 13; uname -r; cat "$TREADLE_ARGS_FILE"; echo \'{"v": 13}\' >&3'],
            isolation="microvm",
        )
        done = run(api, "in-a-vm", {"args": {"x": 1}})
        assert done["state"] == "success", done
        assert done["isolation"] == "microvm" and done["result"] == {"v": 13}
        echoed, kernel, args = output(api, done["id"])["stdout"].splitlines()
        assert (echoed, args) == ("13", '{"x": 1}')
        assert kernel != platform.release()


def test_a_sandbox_runs_in_its_own_vm(cluster: Cluster) -> None:
    with Client(url=cluster.url, api_key=cluster.admin_key) as client:
        sandbox = Sandbox.create(client=client, isolation="microvm", env={"WHO": "vm"})
        try:
            sandbox.wait_for_status("running", timeout=120)
            done = sandbox.run(["sh", "-c", "echo $WHO; uname -r"])
            assert done.exit_code == 0, done.stderr
            who, kernel = done.stdout.splitlines()
            assert who == "vm" and kernel != platform.release()
        finally:
            sandbox.kill()


def test_a_start_of_a_shape_seen_before_takes_a_warm_vm(cluster: Cluster) -> None:
    with cluster.client() as api:
        node = api.get("/v1/nodes").json()["items"][0]
        # What the pool may hold is not offered to placement.
        assert node["capacity"]["memory_mib"] == 4096 - WARM_MIB
        echo = ["sh", "-c", 'cat "$TREADLE_ARGS_FILE"; echo 13 >&3']
        register(api, "warm-echo", echo, isolation="microvm")
        for n in (1, 2):
            before = pool_metrics()

            def filled() -> bool:
                now = pool_metrics()
                return (
                    now["treadle_shuttle_warm_pool_vmsready"] >= 1
                    and not (now["treadle_shuttle_warm_pool_vmsbooting"])
                )

            if n == 2:  # its shape was seen: the pool boots one for it
                eventually(filled, timeout=120, what="a warm VM of the function's shape")
                before = pool_metrics()
            done = run(api, "warm-echo", {"args": {"n": n}})
            assert (done["state"], done["result"]) == ("success", 13), done
            assert output(api, done["id"])["stdout"] == f'{{"n": {n}}}'  # its own args
            after = pool_metrics()
            hits = "treadle_shuttle_warm_pool_takes_totalhit"
            assert after[hits] - before[hits] == (n == 2)
