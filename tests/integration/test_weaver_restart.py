"""Killing Weaver loses nothing: accepted work is durable, and what nodes did meanwhile is
replayed to the new process (DESIGN §2-3)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from support.cluster import PYTHON, Cluster, eventually

pytestmark = pytest.mark.integration


def test_sigkilled_weaver_comes_back_with_everything(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, store: dict[str, str]
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    script = (
        "import os, time\n"
        f"open({str(started)!r}, 'w').close()\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "print('finished while Weaver was away')\n"
    )
    c = Cluster(tmp_path_factory.mktemp("restart"))
    try:
        c.start_weaver(**store)
        c.start_shuttle("steady", "--cpu", "1000")
        with c.client() as api:
            api.post(
                "/v1/functions",
                json={
                    "name": "gated",
                    "command": [PYTHON, "-c", script],
                    "resources": {"cpu_millicores": 1000},
                },
            )
            api.post(
                "/v1/functions",
                json={
                    "name": "queued",
                    "command": ["/bin/echo", "{n}"],
                    "resources": {"cpu_millicores": 1000},
                },
            )
            running = api.post("/v1/functions/gated/invoke", json={}).json()
            eventually(started.exists, what="the gated job to start")
            # the node is full: these wait in Weaver's queue, accepted but not yet placed
            queued = [
                api.post("/v1/functions/queued/invoke", json={"args": {"n": i}}).json()
                for i in range(5)
            ]
            assert all(e["state"] == "open" for e in queued)

        assert c.weaver is not None
        c.weaver.stop(signal.SIGKILL)
        gate.touch()  # the job ends while Weaver is gone; the node keeps its exit report
        c.start_weaver(**store)

        with c.client() as api:

            def ended(execution_id: str) -> dict[str, object] | None:
                e = api.get(f"/v1/executions/{execution_id}").json()
                return e if e["state"] not in ("open", "running") else None

            done = eventually(
                lambda: ended(running["id"]), timeout=60, what="the exit report to be replayed"
            )
            assert (done["state"], done["attempt"]) == ("success", 1)
            out = api.get(f"/v1/executions/{running['id']}/output").json()
            assert out["stdout"] == "finished while Weaver was away\n"
            for i, execution in enumerate(queued):
                final = eventually(
                    lambda e=execution: ended(e["id"]),
                    timeout=60,
                    what="queued work to run after the restart",
                )
                assert (final["state"], final["attempt"]) == ("success", 1)
                assert (
                    api.get(f"/v1/executions/{execution['id']}/output").json()["stdout"] == f"{i}\n"
                )
    finally:
        gate.touch()
        c.stop()
