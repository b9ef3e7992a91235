"""Metering under faults: while sandboxes run and are metered every fifth of a second, the
node's link is cut, Weaver is killed and started again, and the Shuttle is SIGKILLed and
started again. Afterwards every incarnation's records are there once each, numbered without a
gap, meeting end to start, and those that were stopped end with their final record: nothing
was lost and nothing counted twice. The CPU seconds metered of the last incarnations are
their cgroups' own counters."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from support.cgroups import cpu_s, groups_of
from support.cluster import Cluster, eventually
from support.proxy import Proxy
from treadle.client import Client, Sandbox
from treadle.weaver.store.database import sync_url

pytestmark = pytest.mark.integration

# A little CPU now and then, so that there is some to meter.
BUSY = "while :; do i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; sleep 0.1; done"


def records(url: str) -> dict[tuple[str, int], list[Any]]:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT * FROM usage_records WHERE kind = 'sandbox' "
                    "ORDER BY workload_id, generation, seq"
                )
            ).all()
    finally:
        engine.dispose()
    found: dict[tuple[str, int], list[Any]] = {}
    for row in rows:
        found.setdefault((row.workload_id, row.generation), []).append(row)
    return found


def grows(url: str, beyond: int) -> Callable[[], bool]:
    return lambda: sum(len(r) for r in records(url).values()) > beyond


def test_records_survive_cut_links_and_restarts_once_each(
    tmp_path: Path, store: dict[str, str]
) -> None:
    settings = {"node_down_after_s": "2", **store}
    cluster = Cluster(tmp_path)
    url = settings.get("database_url") or f"sqlite:///{cluster.home / 'treadle.db'}"
    proxy = None
    try:
        cluster.start_weaver(process_tier=False, **settings)
        proxy = Proxy(cluster.port)
        node = ("--runtime", "namespace", "--usage-interval", "0.2", "--cpu", "16000")
        shuttle = cluster.start_shuttle("metered", *node, via=proxy.url)
        with Client(url=cluster.url, api_key=cluster.admin_key) as client:
            sandboxes = [
                Sandbox.create(client=client, timeout=600, restart="always") for _ in range(3)
            ]
            for sandbox in sandboxes:
                sandbox.wait_for_status("running", timeout=60)
                sandbox.exec(["sh", "-c", BUSY], tag="busy").close()
            eventually(grows(url, 6), timeout=30, what="the first records")

            # The link cut: records pile up in the node's journal, then all arrive.
            before = sum(len(r) for r in records(url).values())
            proxy.cut()
            time.sleep(1.0)  # an outage: records made meanwhile wait on the node
            proxy.restore()
            eventually(grows(url, before + 15), timeout=30, what="records after the cut")

            # Weaver killed and started again: the node replays what it holds.
            assert cluster.weaver is not None
            cluster.weaver.stop(signal.SIGKILL)
            before = sum(len(r) for r in records(url).values())
            cluster.start_weaver(process_tier=False, **settings)
            eventually(grows(url, before + 15), timeout=60, what="records after the restart")

            # The Shuttle SIGKILLed: what it journalled comes back with the next one.
            shuttle.stop(signal.SIGKILL)
            shuttle = cluster.start_shuttle("metered", *node, via=proxy.url)
            for sandbox in sandboxes:
                eventually(
                    lambda s=sandbox: (
                        s.refresh()["status"] == "running" and s.refresh()["incarnation"] > 1
                    ),
                    timeout=60,
                    what=f"{sandbox.id} to run again",
                )
            before = sum(len(r) for r in records(url).values())
            eventually(grows(url, before + 6), timeout=30, what="the new incarnations' records")

            # Frozen, a sandbox's CPU counter stands still: once each incarnation has a record
            # that ends after the counters were read, its records hold all of its CPU.
            current = {(s.id, s.refresh()["incarnation"]) for s in sandboxes}
            for sandbox in sandboxes:
                sandbox.pause()
            for sandbox in sandboxes:
                sandbox.wait_for_status("paused", timeout=30)
            groups = groups_of(cluster.root / "metered")
            assert len(groups) == len(sandboxes)  # the killed Shuttle's were swept
            counted = sum(cpu_s(group) for group in groups)
            read_at = time.time()
            eventually(
                lambda: all(records(url)[key][-1].end > read_at for key in current),
                timeout=30,
                what="a record after the counters were read",
            )
            metered = sum(r.cpu_s for key in current for r in records(url)[key])
            for sandbox in sandboxes:
                sandbox.kill()
            eventually(
                lambda: all((rows := records(url).get(key)) and rows[-1].final for key in current),
                timeout=60,
                what="every stopped incarnation's final record",
            )
    finally:
        if proxy is not None:
            proxy.close()
        cluster.stop()

    found = records(url)
    assert {key[0] for key in found} == {s.id for s in sandboxes}
    for key, rows in found.items():
        # None lost, none twice: 1, 2, 3, … and the intervals meet end to start.
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), key
        for earlier, later in itertools.pairwise(rows):
            assert later.start == pytest.approx(earlier.end), key
        assert sum(r.final for r in rows) <= 1 and (
            not any(r.final for r in rows) or rows[-1].final
        )
    for key in current:
        assert found[key][-1].final
    assert sum(r.cpu_s for rows in found.values() for r in rows) > 0
    # What was metered of the incarnations that ran last is what their cgroups counted.
    assert counted > 0 and metered == pytest.approx(counted, abs=1e-5)
