"""Chaos for sandboxes (DESIGN §10), as tests/support/chaos.py is for executions.

A real Weaver and three real Shuttles (process tier, for speed), each behind its own `Proxy`,
hold sandboxes of every restart policy while a seeded chaos loop SIGKILLs Shuttles (each
started again on its home, or replaced by a new node), cuts links (connections reset) and
stalls them (bytes stop, connections stay open), and restores them. One Shuttle is left
alone, so that some sandboxes come through untouched; the first fault is always the SIGKILL
of a node that holds sandboxes of every policy. More sandboxes are created while the chaos
goes on.

Once the faults are undone and the fleet has settled, what Weaver says is checked against
what runs on this host (every guest agent of the process tier is a host process whose HOME
names its node, sandbox and incarnation):

- every sandbox is in exactly one state: `running`, or terminal (`failed`, `stopped`), and
  the store's event log holds at most one terminal event for it, as its last one, and one
  restart per `restarts`;
- none is running twice: a running sandbox has exactly one guest agent on this host, on the
  node and of the incarnation Weaver names, and that node is connected; an ended one has none;
- none is lost, and each ended as its policy says: `always` and `on_failure` ones run, `never`
  ones run their first incarnation or have failed; those on the first killed node ran again
  (`restarts` >= 1), or failed for `never`;
- a sandbox Weaver says was never restarted kept its files, one restarted is fresh;
- exec answers in every running one.
"""

from __future__ import annotations

import heapq
import itertools
import random
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.chaos import QUICK_SETTINGS, event_log
from support.cluster import Cluster, Proc, eventually
from support.proxy import Proxy
from support.sandboxes import agents_on_host, create, reaches

pytestmark = pytest.mark.integration

SEED = 11
CHAOS_S = 12.0
FAULT_EVERY_S = (0.4, 1.2)
POLICIES = ("always", "on_failure", "never")
# Equal speeds: placement then spreads sandboxes by load, not by which node measured faster.
SHUTTLE_ARGS = ("--cpu", "4000", "--perf-score", "1")
# Small, so that two nodes can hold every sandbox.
SMALL = {"cpu_millicores": 100, "memory_mib": 32, "disk_mib": 0}
TERMINAL = ("stopped", "failed")
STEADY = "steady"


class SandboxChaos:
    """The fault schedule, from a seeded `random.Random`: one fault every `FAULT_EVERY_S`,
    each undone after an outage of up to twice `node_down_after_s`, so that some last past
    the grace period and some do not. The `STEADY` node is never touched: what runs there
    and is never moved must come through unchanged."""

    def __init__(
        self, cluster: Cluster, rng: random.Random, down_after: float, proxies: dict[str, Proxy]
    ) -> None:
        self._cluster = cluster
        self._rng = rng
        self._down_after = down_after
        self.proxies = proxies
        self.procs: dict[str, Proc] = {}
        self._broken: set[str] = set()  # killed, cut or stalled now
        self._scheduled: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._spares = itertools.count()
        self.kills = self.replacements = self.cuts = self.stalls = 0

    def start(self, name: str, *, wait: bool = True) -> None:
        proxy = self.proxies.get(name) or Proxy(self._cluster.port)
        self.proxies[name] = proxy
        self.procs[name] = self._cluster.start_shuttle(
            name, *SHUTTLE_ARGS, wait=wait, via=proxy.url
        )

    def run(self, seconds: float, during: Mapping[float, Callable[[], None]]) -> None:
        """Faults for `seconds`; each of `during` (seconds from now: action) runs once."""
        began = time.monotonic()
        for at, action in during.items():
            self._later(at, action)
        next_fault = began + self._rng.uniform(*FAULT_EVERY_S)
        while time.monotonic() < began + seconds:
            now = time.monotonic()
            self._run_due(now)
            if now >= next_fault:
                self.fault()
                next_fault = now + self._rng.uniform(*FAULT_EVERY_S)
            time.sleep(0.02)  # the loop's pace, not a wait for anything

    def settle(self) -> None:
        """Undo every fault still in force (what is due is done at once)."""
        while self._scheduled:
            _, _, action = heapq.heappop(self._scheduled)
            action()

    def fault(self, kind: str | None = None, name: str | None = None) -> None:
        intact = sorted(n for n in self.proxies if n not in self._broken and n != STEADY)
        if not intact and name is None:
            return
        name = name or self._rng.choice(intact)
        kind = kind or self._rng.choice(("kill", "kill", "cut", "stall"))
        outage = self._rng.uniform(0.05, 2.0 * self._down_after)
        self._broken.add(name)
        if kind == "kill":
            self.procs[name].stop(signal.SIGKILL)
            self.kills += 1
            if self._rng.random() < 0.3:
                # replaced by a new node; the old one never comes back
                self._later(outage, self._replace)
            else:
                self._later(outage, lambda: self._restart(name))
        elif kind == "cut":
            self.proxies[name].cut()
            self.cuts += 1
            self._later(outage, lambda: self._restore(name))
        else:
            self.proxies[name].stall()
            self.stalls += 1
            self._later(outage, lambda: self._restore(name))

    def _restart(self, name: str) -> None:
        self.start(name, wait=False)  # same name and home: the same node, holding nothing
        self._broken.discard(name)

    def _replace(self) -> None:
        self.start(f"spare{next(self._spares)}", wait=False)
        self.replacements += 1

    def _restore(self, name: str) -> None:
        self.proxies[name].restore()
        self._broken.discard(name)

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._scheduled, (time.monotonic() + delay, next(self._order), action))

    def _run_due(self, now: float) -> None:
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, action = heapq.heappop(self._scheduled)
            action()

    @property
    def alive(self) -> list[str]:
        """The nodes that run now (each started last under its name and not killed)."""
        return sorted(n for n, p in self.procs.items() if p.alive())


def test_sandboxes_under_chaos(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    settings = dict(QUICK_SETTINGS)
    down_after = float(settings["node_down_after_s"])
    cluster = Cluster(tmp_path)
    chaos = SandboxChaos(cluster, rng, down_after, {})
    try:
        cluster.start_weaver(process_tier=True, **settings)
        for name in (STEADY, "chaos0", "chaos1"):
            chaos.start(name)
        with cluster.client() as api:
            # A Latin square: spread over three nodes in turn, each node gets every policy.
            order = [POLICIES[(i + k) % 3] for k in range(3) for i in range(3)]
            first = [make(api, policy) for policy in order]
            for sandbox in first:
                reaches(api, sandbox["id"], "running")
                witness(api, sandbox["id"])
            # The first fault: the node holding the most sandboxes, of every policy.
            rows = [api.get(f"/v1/sandboxes/{s['id']}").json() for s in first]
            holders: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                holders.setdefault(row["node_id"], []).append(row)
            holders.pop(node_id(cluster, STEADY) or "", None)
            victim_id = max(
                holders, key=lambda n: (len({r["restart"] for r in holders[n]}), len(holders[n]))
            )
            victims = {r["id"]: r for r in holders[victim_id]}
            assert {r["restart"] for r in victims.values()} == set(POLICIES), holders
            victim = next(n for n in chaos.procs if node_id(cluster, n) == victim_id)
            chaos.fault("kill", victim)

            made: list[dict[str, Any]] = []
            during = {
                at: (lambda p=p: made.append(make(api, p)))
                for at, p in zip((2.0, 5.0, 8.0), POLICIES, strict=True)
            }
            chaos.run(CHAOS_S, during)
            chaos.settle()
            assert chaos.kills >= 1, "no Shuttle was killed"

            eventually(
                lambda: all(cluster.node_named(n, connected=True) for n in chaos.alive),
                timeout=30,
                what="every Shuttle to be connected after the chaos",
            )
            sandboxes = [*first, *made]
            ids = [s["id"] for s in sandboxes]
            names = {node_id(cluster, n): n for n in chaos.procs}

            def converged() -> list[dict[str, Any]] | None:
                rows = [api.get(f"/v1/sandboxes/{i}").json() for i in ids]
                if differences(rows, agents_on_host(tmp_path), names):
                    return None
                return rows

            try:
                rows = eventually(converged, timeout=60, what="the fleet to settle")
            except AssertionError:
                rows = [api.get(f"/v1/sandboxes/{i}").json() for i in ids]
                problems = differences(rows, agents_on_host(tmp_path), names)
                raise AssertionError(
                    f"not settled (seed {SEED}, logs in {tmp_path}): " + "; ".join(problems)
                ) from None

            violations = check(api, cluster, rows, victims, first_ids={s["id"] for s in first})
            summary = (
                f"seed {SEED}: {chaos.kills} kills ({chaos.replacements} replaced), "
                f"{chaos.cuts} cuts, {chaos.stalls} stalls; logs in {tmp_path}"
            )
            assert not violations, summary + "\n" + "\n".join(violations)
    finally:
        for proxy in chaos.proxies.values():
            proxy.close()
        cluster.stop()


def make(api: httpx.Client, policy: str) -> dict[str, Any]:
    return create(
        api,
        isolation="process",
        restart=policy,
        resources=SMALL,
        timeout_s=900,
        metadata={"policy": policy},
    )


def witness(api: httpx.Client, sandbox_id: str) -> None:
    """A file the first incarnation leaves in its home: a sandbox that was not started again
    still has it."""
    response = api.post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": f"echo {sandbox_id} > witness"}
    )
    assert response.status_code == 200 and response.json()["exit_code"] == 0, response.text


def node_id(cluster: Cluster, name: str) -> str | None:
    node = cluster.node_named(name)
    return None if node is None else str(node["id"])


def differences(
    rows: list[dict[str, Any]],
    agents: dict[str, list[tuple[str, int, int]]],
    names: dict[str | None, str],
) -> list[str]:
    """How Weaver's view and this host's differ: a sandbox not yet settled (not running nor
    ended), one running without its agent or with more than one, or ended with one left."""
    problems = []
    for row in rows:
        found = agents.get(row["id"], [])
        if row["status"] == "running":
            wanted = (names.get(row["node_id"], f"?{row['node_id']}"), row["incarnation"])
            if [(node, inc) for node, inc, _ in found] != [wanted]:
                problems.append(f"{row['id']} runs {wanted} for Weaver; agents here: {found}")
        elif row["status"] in TERMINAL:
            if found:
                problems.append(f"{row['id']} is {row['status']}; agents still here: {found}")
        else:
            problems.append(f"{row['id']} is {row['status']} (incarnation {row['incarnation']})")
    return problems


def check(
    api: httpx.Client,
    cluster: Cluster,
    rows: list[dict[str, Any]],
    victims: dict[str, dict[str, Any]],
    first_ids: set[str],
) -> list[str]:
    violations: list[str] = []
    nodes = {n["id"]: n for n in api.get("/v1/nodes").json()["items"]}
    events = event_log(cluster, "sandbox")
    for row in rows:
        what = f"{row['id']} ({row['restart']}, {row['status']}, incarnation {row['incarnation']})"
        if row["restarts"] != row["incarnation"] - 1:
            violations.append(f"{what}: {row['restarts']} restarts")
        if row["restart"] in ("always", "on_failure") and row["status"] != "running":
            violations.append(f"{what}: ended ({row['end_reason']}) although its policy restarts")
        if row["restart"] == "never":
            if row["status"] == "running" and row["incarnation"] != 1:
                violations.append(f"{what}: started again although its policy is never")
            if row["status"] == "stopped":
                violations.append(f"{what}: stopped ({row['end_reason']}); nobody asked")
            if (
                row["status"] == "failed"
                and "lost" not in (row["end_reason"] or "")
                and ("no longer holds it" not in (row["end_reason"] or ""))
            ):
                violations.append(f"{what}: failed for {row['end_reason']!r}")
        if row["id"] in victims:
            if row["restart"] == "never" and row["status"] != "failed":
                violations.append(f"{what}: its node was killed, yet it did not fail")
            if row["restart"] != "never" and row["restarts"] < 1:
                violations.append(f"{what}: its node was killed, yet it was not started again")
        if row["status"] == "running":
            node = nodes.get(row["node_id"])
            if node is None or not node["connected"] or node["state"] != "ready":
                violations.append(f"{what}: runs on node {node}")
            answer = api.post(
                f"/v1/sandboxes/{row['id']}/exec", json={"cmd": "cat witness 2>/dev/null; echo ok"}
            )
            if answer.status_code != 200:
                violations.append(f"{what}: exec answered {answer.status_code} {answer.text}")
            else:
                out = answer.json()["stdout"]
                kept = row["id"] in first_ids and row["incarnation"] == 1
                expected = (f"{row['id']}\n" if kept else "") + "ok\n"
                if out != expected:
                    violations.append(f"{what}: exec printed {out!r}, not {expected!r}")
        kinds = [(kind, data) for kind, data in events.get(row["id"], [])]
        terminal = [kind for kind, _ in kinds if kind in TERMINAL]
        restarted = [d for kind, d in kinds if kind == "pending" and d.get("incarnation", 1) > 1]
        if row["status"] in TERMINAL and (
            terminal != [row["status"]] or kinds[-1][0] != row["status"]
        ):
            violations.append(f"{what}: events {[k for k, _ in kinds]}")
        if row["status"] not in TERMINAL and terminal:
            violations.append(f"{what}: events {[k for k, _ in kinds]}")
        if len(restarted) != row["restarts"]:
            violations.append(f"{what}: {len(restarted)} restart events for {row['restarts']}")
    return violations
