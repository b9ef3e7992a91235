"""Chaos for the execution lifecycle (DESIGN §2-3), shared by tests/integration/test_chaos.py
and bench/soak.py.

A real Weaver and K real Shuttles, each Shuttle behind its own `Proxy`, run executions that
print a known sequence while a seeded chaos thread SIGKILLs and restarts Shuttles, cuts their
links (connections reset) or stalls them (bytes stop flowing, connections stay open) and
restores them, and SIGKILLs and restarts Weaver. Invokes carry an idempotency key and are
retried while Weaver is away. While the chaos goes on, no execution may be `open` (not
started, as far as Weaver knows) while output of its current attempt is stored (sampled).
Once everything has ended, the invariants are checked through the API and the store's event
log:

- every submitted execution exists, once per idempotency key, and is terminal;
- 1 <= attempt <= max_attempts;
- it ended `success`, or `failure` with error `node_lost` after its last attempt: nothing
  in this workload can fail in any other way;
- a success's stored stdout is exactly what it printed: complete, in order, once;
- the event log holds exactly one terminal event for it, as its last event, and one requeue
  event per extra attempt.

Violations are collected, not raised, so that one run reports all of them at once.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import create_engine, select

from support.cluster import Cluster, Proc, eventually
from support.proxy import Proxy
from treadle.weaver.store import tables

__all__ = [
    "FUNCTION",
    "QUICK_SETTINGS",
    "ChaosReport",
    "Job",
    "event_log",
    "make_jobs",
    "run_chaos",
]

FUNCTION = "chaos"
MAX_ATTEMPTS = 5
TERMINAL = frozenset({"success", "failure", "timeout", "cancelled"})
# Short heartbeats and down-after, so that lost nodes are noticed within a test's time; a
# short startup grace, so that a node that does not come back after a Weaver restart is
# declared down soon as well.
QUICK_SETTINGS: dict[str, str] = {
    "heartbeat_s": "0.25",
    "node_down_after_s": "1.5",
    "node_startup_grace_s": "3",
}
# Prints `{tag}-0` … `{tag}-{n-1}`, pausing after line `pause_at`: a fault can land between
# executions, before one printed anything, or halfway through its output.
COMMAND = [
    "/bin/sh",
    "-c",
    "i=0; while [ $i -lt {n} ]; do echo {tag}-$i; i=$((i+1)); "
    "if [ $i -eq {pause_at} ]; then sleep {pause}; fi; done",
]
# Many small slots per node, so that a killed node takes dozens of running executions.
SHUTTLE_ARGS = ("--cpu", "4000")
RESOURCES = {"cpu_millicores": 100, "memory_mib": 16, "disk_mib": 0}
# A few run for seconds, so that one execution can live through several faults of its node.
_PAUSES = ("0", "0", "0", "0.05", "0.1", "0.3", "0.6", "2")
_PAGE = 500


@dataclass(frozen=True, slots=True)
class Job:
    key: str
    tag: str
    lines: int
    pause_at: int
    pause: str

    @property
    def body(self) -> dict[str, Any]:
        args = {"tag": self.tag, "n": self.lines, "pause_at": self.pause_at, "pause": self.pause}
        return {"args": args, "idempotency_key": self.key}

    @property
    def stdout(self) -> str:
        return "".join(f"{self.tag}-{i}\n" for i in range(self.lines))


def make_jobs(seed: int, count: int) -> list[Job]:
    rng = random.Random(f"jobs-{seed}")
    jobs = []
    for i in range(count):
        # a few print enough to span many output chunks, so that a cut link or a restarted
        # Weaver falls between chunks of one execution
        lines = rng.randint(5_000, 30_000) if rng.random() < 0.03 else rng.randint(1, 200)
        jobs.append(
            Job(
                key=f"chaos-{seed}-{i}",
                tag=f"s{seed}x{i}",
                lines=lines,
                pause_at=rng.randint(1, lines),
                pause=rng.choice(_PAUSES),
            )
        )
    return jobs


@dataclass
class ChaosReport:
    seed: int
    executions: int = 0
    shuttle_kills: int = 0
    link_cuts: int = 0
    link_stalls: int = 0
    weaver_restarts: int = 0
    invoke_retries: int = 0
    # keys whose invoke was sent but not answered at least once: only the idempotency key
    # kept a retry of those from making a second execution
    invokes_unanswered: int = 0
    # executions that needed more than one attempt
    requeued: int = 0
    # open executions placed on a node whose output was looked at while the chaos went on
    audited: int = 0
    states: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    submit_s: float = 0.0
    settle_s: float = 0.0
    total_s: float = 0.0
    logs: str = ""
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "executions": self.executions,
            "shuttle_kills": self.shuttle_kills,
            "link_cuts": self.link_cuts,
            "link_stalls": self.link_stalls,
            "weaver_restarts": self.weaver_restarts,
            "invoke_retries": self.invoke_retries,
            "invokes_unanswered": self.invokes_unanswered,
            "requeued": self.requeued,
            "audited": self.audited,
            "states": self.states,
            "attempts": {str(k): v for k, v in sorted(self.attempts.items())},
            "submit_s": round(self.submit_s, 1),
            "settle_s": round(self.settle_s, 1),
            "total_s": round(self.total_s, 1),
            "violations": len(self.violations),
        }

    def explain(self, limit: int = 40) -> str:
        shown = "\n".join(f"  - {v}" for v in self.violations[:limit])
        more = len(self.violations) - limit
        return (
            f"{len(self.violations)} invariant violations "
            f"(logs: {self.logs}/weaver.log, <node>.log)\n{shown}"
            + (f"\n  … and {more} more" if more > 0 else "")
            + f"\n{json.dumps(self.summary())}"
        )


def run_chaos(
    cluster: Cluster,
    *,
    settings: Mapping[str, str],
    executions: int = 1000,
    shuttles: int = 3,
    seed: int = 0,
    weaver_restarts: int = 1,
    concurrency: int = 4,
    rate: float | None = None,
    fault_every_s: tuple[float, float] = (0.3, 1.2),
    tail_s: float = 3.0,
    settle_timeout_s: float = 300.0,
) -> ChaosReport:
    """Start Weaver (with `settings`, TREADLE_* names without the prefix) and `shuttles`
    Shuttles in `cluster`, submit `executions` (at most `rate` per second) under chaos, wait
    for all of them to end and check them. The caller stops the cluster."""
    report = ChaosReport(seed=seed, logs=str(cluster.root))
    started = time.monotonic()
    jobs = make_jobs(seed, executions)
    down_after = float(settings.get("node_down_after_s", 3.0))
    cluster.start_weaver(**settings)
    proxies: dict[str, Proxy] = {}
    try:
        procs: dict[str, Proc] = {}
        for k in range(shuttles):
            name = f"chaos{k}"
            proxies[name] = Proxy(cluster.port)
            procs[name] = cluster.start_shuttle(name, *SHUTTLE_ARGS, via=proxies[name].url)
        with cluster.client() as api:
            api.post(
                "/v1/functions",
                json={
                    "name": FUNCTION,
                    "command": COMMAND,
                    "max_attempts": MAX_ATTEMPTS,
                    "resources": RESOURCES,
                    "timeout_s": 120,
                },
            ).raise_for_status()

        rng = random.Random(seed)
        restart_points = sorted(
            round(rng.uniform(0.15, 0.85) * executions) for _ in range(weaver_restarts)
        )
        chaos = _Chaos(cluster, dict(settings), rng, proxies, procs, down_after, fault_every_s)
        submitter = _Submitter(cluster, jobs, concurrency, rate, abort=chaos.failed)
        thread = threading.Thread(
            target=chaos.run,
            args=(submitter.finished, restart_points, submitter.submitted, tail_s),
            name="chaos",
            daemon=True,
        )
        auditor = _Auditor(cluster)
        watcher = threading.Thread(target=auditor.run, args=(thread,), name="audit", daemon=True)
        submitting = time.monotonic()
        thread.start()
        watcher.start()
        try:
            submitter.run()
        finally:
            submitter.finished.set()
            thread.join()
            watcher.join()
        report.submit_s = time.monotonic() - submitting
        if chaos.error is not None:
            raise chaos.error
        chaos.settle()
        report.shuttle_kills = chaos.kills
        report.link_cuts = chaos.cuts
        report.link_stalls = chaos.stalls
        report.weaver_restarts = chaos.restarts
        report.invoke_retries = submitter.retries
        report.invokes_unanswered = len(submitter.unanswered)
        report.violations += submitter.violations
        report.violations += auditor.violations
        report.audited = auditor.audited

        settling = time.monotonic()
        with cluster.client() as api:
            eventually(
                lambda: all(cluster.node_named(n, connected=True) for n in proxies),
                timeout=60,
                what="every Shuttle to be connected after the chaos",
            )
            _wait_until_ended(api, jobs, submitter, report, settle_timeout_s)
            report.settle_s = time.monotonic() - settling
            _check(api, cluster, settings, jobs, submitter.ids, report)
    finally:
        for proxy in proxies.values():
            proxy.close()
    report.total_s = time.monotonic() - started
    return report


class _Submitter:
    """Invokes every job once, from a few threads; a request that does not reach Weaver, or
    whose answer does not come back, is sent again with the same idempotency key."""

    def __init__(
        self,
        cluster: Cluster,
        jobs: list[Job],
        concurrency: int,
        rate: float | None,
        abort: threading.Event,
        give_up_after_s: float = 120.0,
    ) -> None:
        self._cluster = cluster
        self._jobs = jobs
        self._concurrency = concurrency
        self._rate = rate
        self._abort = abort
        self._give_up_after_s = give_up_after_s
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._count = 0
        self._start = 0.0
        self.finished = threading.Event()
        self.retries = 0
        self.unanswered: set[str] = set()
        self.ids: dict[str, set[str]] = {}
        self.violations: list[str] = []

    def submitted(self) -> int:
        return self._count

    def run(self) -> None:
        self._start = time.monotonic()
        try:
            with ThreadPoolExecutor(self._concurrency, thread_name_prefix="invoke") as pool:
                for _ in pool.map(self._submit, range(len(self._jobs))):
                    pass
        finally:
            for client in self._clients:
                client.close()

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._cluster.client()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _submit(self, index: int) -> None:
        job = self._jobs[index]
        if self._rate:
            # pacing, so that the chaos has time to land among the submissions
            delay = self._start + index / self._rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        api = self._client()
        deadline = time.monotonic() + self._give_up_after_s
        while True:
            try:
                response = api.post(f"/v1/functions/{FUNCTION}/invoke", json=job.body)
            except httpx.TransportError as exc:
                with self._lock:
                    self.retries += 1
                    if not isinstance(exc, httpx.ConnectError):
                        self.unanswered.add(job.key)
                if self._abort.is_set() or time.monotonic() > deadline:
                    self._violation(f"{job.key}: Weaver never accepted the invoke")
                    return
                time.sleep(0.05)  # pacing while Weaver is away
                continue
            if response.status_code >= 500:
                self._violation(f"{job.key}: invoke answered {response.status_code}")
                continue
            if response.status_code not in (200, 201, 202):
                self._violation(f"{job.key}: invoke answered {response.status_code}")
                return
            execution = response.json()
            if execution.get("idempotency_key") != job.key:
                self._violation(f"{job.key}: invoke returned {execution!r}")
            with self._lock:
                self.ids.setdefault(job.key, set()).add(execution["id"])
                self._count += 1
            return

    def _violation(self, text: str) -> None:
        with self._lock:
            self.violations.append(text)


class _Chaos:
    """The fault schedule: decisions come from a seeded `random.Random`, so a seed replays
    the same sequence of faults (not their exact timing relative to the work)."""

    def __init__(
        self,
        cluster: Cluster,
        settings: dict[str, str],
        rng: random.Random,
        proxies: dict[str, Proxy],
        procs: dict[str, Proc],
        down_after: float,
        fault_every_s: tuple[float, float],
    ) -> None:
        self._cluster = cluster
        self._settings = settings
        self._rng = rng
        self._proxies = proxies
        self._procs = procs
        self._down_after = down_after
        self._fault_every_s = fault_every_s
        self._scheduled: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._killed: set[str] = set()
        self._broken: set[str] = set()
        self.kills = 0
        self.cuts = 0
        self.stalls = 0
        self.restarts = 0
        self.failed = threading.Event()
        self.error: BaseException | None = None

    def run(
        self,
        submitted_all: threading.Event,
        restart_points: list[int],
        submitted: Callable[[], int],
        tail_s: float,
    ) -> None:
        try:
            self._run(submitted_all, list(restart_points), submitted, tail_s)
        except BaseException as exc:
            self.error = exc
            self.failed.set()

    def _run(
        self,
        submitted_all: threading.Event,
        restart_points: list[int],
        submitted: Callable[[], int],
        tail_s: float,
    ) -> None:
        next_fault = time.monotonic() + self._rng.uniform(*self._fault_every_s)
        ends: float | None = None
        while True:
            now = time.monotonic()
            self._run_due(now)
            # after the last invoke, any restart still due happens at once
            if restart_points and (submitted() >= restart_points[0] or submitted_all.is_set()):
                restart_points.pop(0)
                self._restart_weaver()
                continue
            if submitted_all.is_set() and not restart_points:
                # keep going a little while the last executions run
                ends = ends or now + tail_s
                if now >= ends:
                    return
            if now >= next_fault:
                self._fault()
                next_fault = now + self._rng.uniform(*self._fault_every_s)
            time.sleep(0.02)

    def settle(self) -> None:
        """Undo every fault still in force: links restored, Shuttles running again."""
        for _, _, action in sorted(self._scheduled):
            action()
        self._scheduled.clear()

    def _run_due(self, now: float) -> None:
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, action = heapq.heappop(self._scheduled)
            action()

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._scheduled, (time.monotonic() + delay, next(self._order), action))

    def _fault(self) -> None:
        alive = sorted(set(self._procs) - self._killed)
        intact = sorted(set(self._proxies) - self._broken)
        kinds = [k for k, ok in (("kill", alive), ("cut", intact), ("stall", intact)) if ok]
        if not kinds:
            return
        # Shorter and longer than node_down_after_s: a node that comes back in time keeps
        # its work, one that does not loses it.
        outage = self._rng.uniform(0.05, 2.0 * self._down_after)
        kind = self._rng.choice(kinds)
        if kind == "kill":
            name = self._rng.choice(alive)
            self._procs[name].stop(signal.SIGKILL)
            self._killed.add(name)
            self.kills += 1
            self._later(outage, lambda: self._restart_shuttle(name))
            return
        name = self._rng.choice(intact)
        proxy = self._proxies[name]
        if kind == "cut":
            proxy.cut()
            self.cuts += 1
        else:
            proxy.stall()
            self.stalls += 1
        self._broken.add(name)
        self._later(outage, lambda: self._restore(name))

    def _restart_shuttle(self, name: str) -> None:
        # Same name and home: it rejoins as the same node, with nothing running.
        self._procs[name] = self._cluster.start_shuttle(
            name, *SHUTTLE_ARGS, wait=False, via=self._proxies[name].url
        )
        self._killed.discard(name)

    def _restore(self, name: str) -> None:
        self._proxies[name].restore()
        self._broken.discard(name)

    def _restart_weaver(self) -> None:
        assert self._cluster.weaver is not None
        self._cluster.weaver.stop(signal.SIGKILL)
        time.sleep(self._rng.uniform(0.0, 1.0))  # invokes meet a closed port for a while
        self._cluster.start_weaver(**self._settings)
        self.restarts += 1


class _Auditor:
    """Samples, while the chaos goes on, the executions Weaver holds as `open` on a node: one
    whose current attempt already has stored output runs there although Weaver believes it
    never started, so losing its node would place it again under the same attempt number.

    Output of an attempt is stored only after its `started` report (both come from its node,
    in order), so seeing output and then still `open` at that attempt is never a race."""

    def __init__(self, cluster: Cluster, every_s: float = 0.25) -> None:
        self._cluster = cluster
        self._every_s = every_s
        self._flagged: set[str] = set()
        self.audited = 0
        self.violations: list[str] = []

    def run(self, chaos: threading.Thread) -> None:
        with self._cluster.client() as api:
            while chaos.is_alive():
                # a sample that meets Weaver being restarted is skipped
                with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                    self._sample(api)
                time.sleep(self._every_s)  # sampling, not waiting for anything

    def _sample(self, api: httpx.Client) -> None:
        page = api.get("/v1/executions", params={"state": "open", "limit": _PAGE}).json()
        for row in page["items"]:
            if row["node_id"] is None or row["id"] in self._flagged:
                continue
            self.audited += 1
            output = api.get(f"/v1/executions/{row['id']}/output").json()
            if not (output["stdout"] or output["stderr"]):
                continue
            now = api.get(f"/v1/executions/{row['id']}").json()
            if now["state"] == "open" and now["attempt"] == output["attempt"]:
                self._flagged.add(row["id"])
                self.violations.append(
                    f"{row['id']} ({row['idempotency_key']}): open at attempt {now['attempt']} "
                    f"on node {now['node_id']} while {len(output['stdout'])} characters of "
                    "that attempt's output are stored"
                )


def _pages(api: httpx.Client, **params: Any) -> Iterator[dict[str, Any]]:
    cursor: str | None = None
    while True:
        query = {"limit": _PAGE, **params, **({"cursor": cursor} if cursor else {})}
        response = api.get("/v1/executions", params=query)
        response.raise_for_status()
        page = response.json()
        yield from page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return


def _wait_until_ended(
    api: httpx.Client,
    jobs: list[Job],
    submitter: _Submitter,
    report: ChaosReport,
    timeout: float,
) -> None:
    by_key = {job.key: job for job in jobs}

    def ended() -> bool:
        for state in ("open", "running"):
            items = api.get("/v1/executions", params={"state": state, "limit": 1}).json()
            if items["items"]:
                job = by_key.get(items["items"][0]["idempotency_key"])
                if job is None:
                    return False  # not ours; the full check reports it
                # Invoking again with the key waits on Weaver's side for that execution
                # to end (up to `wait`) and proves the key still names it.
                again = api.post(
                    f"/v1/functions/{FUNCTION}/invoke", params={"wait": 5}, json=job.body
                )
                submitter.ids.setdefault(job.key, set()).add(again.json()["id"])
                return False
        return all(e["state"] in TERMINAL for e in _pages(api))

    try:
        eventually(ended, timeout=timeout, what="every execution to end")
    except AssertionError:
        stuck = [e for e in _pages(api) if e["state"] not in TERMINAL]
        report.violations.append(
            f"{len(stuck)} executions did not end within {timeout:.0f}s: "
            + ", ".join(
                f"{e['id']} {e['state']} attempt {e['attempt']} on {e['node_id']}"
                for e in stuck[:20]
            )
        )


def _check(
    api: httpx.Client,
    cluster: Cluster,
    settings: Mapping[str, str],
    jobs: list[Job],
    ids: dict[str, set[str]],
    report: ChaosReport,
) -> None:
    violations = report.violations
    rows = list(_pages(api))
    report.executions = len(rows)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(str(row["idempotency_key"]), []).append(row)
    keys = {job.key for job in jobs}
    for key in sorted(set(by_key) - keys):
        violations.append(f"executions nobody submitted: key {key}: {by_key[key]}")
    for job in jobs:
        found = by_key.get(job.key, [])
        answered = ids.get(job.key, set())
        if len(found) != 1:
            violations.append(f"{job.key}: {len(found)} executions: {[e['id'] for e in found]}")
        if len(answered) > 1:
            violations.append(f"{job.key}: invokes answered several ids {sorted(answered)}")
        if found and answered and found[0]["id"] not in answered:
            violations.append(f"{job.key}: stored {found[0]['id']}, invoke said {answered}")

    jobs_by_key = {job.key: job for job in jobs}
    states: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    for row in rows:
        attempts[row["attempt"]] += 1
        states[row["state"] + (f":{row['error']}" if row["error"] else "")] += 1
        what = f"{row['id']} ({row['idempotency_key']})"
        if row["state"] not in TERMINAL:
            violations.append(f"{what}: not terminal: {row['state']}")
        if not 1 <= row["attempt"] <= row["max_attempts"] or row["max_attempts"] != MAX_ATTEMPTS:
            violations.append(f"{what}: attempt {row['attempt']} of {row['max_attempts']}")
        if row["state"] == "failure":
            if row["error"] != "node_lost" or row["attempt"] != row["max_attempts"]:
                violations.append(
                    f"{what}: failure {row['error']!r} (exit {row['exit_code']}) at attempt "
                    f"{row['attempt']} of {row['max_attempts']}"
                )
        elif row["state"] == "success":
            expected = jobs_by_key.get(str(row["idempotency_key"]))
            if expected is not None:
                _check_output(api, row, expected, violations)
        elif row["state"] in TERMINAL:
            violations.append(f"{what}: ended {row['state']} ({row['error']})")
    report.states = dict(sorted(states.items()))
    report.attempts = dict(sorted(attempts.items()))
    report.requeued = sum(n for attempt, n in attempts.items() if attempt > 1)
    _check_events(cluster, settings, rows, violations)


def _check_output(api: httpx.Client, row: dict[str, Any], job: Job, violations: list[str]) -> None:
    what = f"{row['id']} ({job.key}, attempt {row['attempt']})"
    if row["exit_code"] != 0:
        violations.append(f"{what}: success with exit code {row['exit_code']}")
    output = api.get(f"/v1/executions/{row['id']}/output").json()
    if output["attempt"] != row["attempt"] or not output["complete"] or output["stderr"]:
        violations.append(
            f"{what}: output of attempt {output['attempt']}, complete={output['complete']}, "
            f"stderr={output['stderr'][:200]!r}"
        )
    if output["stdout"] == job.stdout:
        return
    got = output["stdout"].splitlines()
    want = job.stdout.splitlines()
    first = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    duplicated = sum(n - 1 for n in Counter(got).values() if n > 1)
    violations.append(
        f"{what}: stdout differs: {len(got)} lines for {len(want)}, {duplicated} duplicated, "
        f"first difference at line {first}: {got[first : first + 3]} "
        f"for {want[first : first + 3]}"
    )


def event_log(
    cluster: Cluster, kind: str, database_url: str | None = None
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Each subject's events of `kind` (`execution`, `sandbox`) from the store's log, oldest
    first: (what happened, its data)."""
    url = database_url or f"sqlite:///{cluster.home / 'treadle.db'}"
    events = tables.events
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                select(events.c.subject_id, events.c.type, events.c.data)
                .where(events.c.type.like(f"{kind}.%"))
                .order_by(events.c.seq)
            ).all()
    finally:
        engine.dispose()
    log: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for subject, event, data in found:
        log.setdefault(subject, []).append(
            (event.removeprefix(f"{kind}."), json.loads(data) if isinstance(data, str) else data)
        )
    return log


def _check_events(
    cluster: Cluster,
    settings: Mapping[str, str],
    rows: list[dict[str, Any]],
    violations: list[str],
) -> None:
    """Terminal exactly once, read where it is recorded: the store's event log."""
    log = event_log(cluster, "execution", settings.get("database_url"))
    for row in rows:
        history = log.get(row["id"], [])
        what = f"{row['id']} ({row['idempotency_key']})"
        kinds = [kind for kind, _ in history]
        terminal = [kind for kind in kinds if kind in TERMINAL]
        # A requeue opens the next attempt: from `running`, or from `open` when its node was
        # lost before a start was reported.
        requeues = [d for kind, d in history if kind == "open" and d.get("attempt", 1) > 1]
        if len(terminal) != 1 or not kinds or kinds[-1] != row["state"]:
            violations.append(f"{what} is {row['state']}; its events: {kinds}")
        if len(requeues) != row["attempt"] - 1:
            violations.append(
                f"{what}: attempt {row['attempt']} after {len(requeues)} requeues: {kinds}"
            )
