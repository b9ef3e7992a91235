"""The microvm tier through treadle's API: a node started with `--microvm` offers it, a
function asking for it runs in a VM of its own (its kernel, not the host's), and so does a
sandbox, exec'd into through the API like any other."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.test_executions import output, register, run
from support.cluster import Cluster
from treadle.client import Client, Sandbox

pytestmark = [pytest.mark.integration, pytest.mark.microvm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, package: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("microvm-api"))
    try:
        cluster.start_weaver(process_tier=False)
        tiers = ("--runtime", "namespace", "--runtime", "microvm", "--microvm")
        cluster.start_shuttle("vm0", *tiers, "--cpu", "4000", "--memory", "4096")
        yield cluster
    finally:
        cluster.stop()


def test_the_node_offers_the_tier_and_a_function_runs_in_its_own_vm(cluster: Cluster) -> None:
    with cluster.client() as api:
        node = api.get("/v1/nodes").json()["items"][0]
        assert "microvm" in node["runtimes"]
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
