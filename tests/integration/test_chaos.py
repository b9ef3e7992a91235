"""Under chaos (Shuttles SIGKILLed, links cut or stalled, Weaver SIGKILLed), no execution is
lost, each ends exactly once, attempts stay within max_attempts, every success's stored output
is exactly what it printed, and an execution whose code runs is never shown as `open`
(DESIGN §2-3). The driver and its checks are in support/chaos.py."""

from __future__ import annotations

import json

import pytest

from support.chaos import QUICK_SETTINGS, run_chaos
from support.cluster import Cluster

pytestmark = pytest.mark.integration


def test_nothing_is_lost_or_doubled_under_chaos(
    tmp_path_factory: pytest.TempPathFactory, store: dict[str, str]
) -> None:
    cluster = Cluster(tmp_path_factory.mktemp("chaos"))
    try:
        report = run_chaos(
            cluster,
            settings={**QUICK_SETTINGS, **store},
            executions=1000,
            shuttles=3,
            seed=7,
            weaver_restarts=1,
            # paced, so that the submissions span some eighty faults
            rate=20,
            fault_every_s=(0.2, 1.0),
        )
    finally:
        cluster.stop()
    print(json.dumps(report.summary()))
    assert not report.violations, report.explain()
    assert report.executions == 1000
    # the faults happened, and hit running work: a quiet run proves nothing
    assert report.weaver_restarts == 1
    assert report.shuttle_kills > 0 and report.link_cuts > 0 and report.link_stalls > 0
    assert report.requeued > 0
