"""What the benchmarks start for themselves: a Weaver on SQLite or on a private PostgreSQL
server (the tests' own, `tests/support/postgres.py`), a real Shuttle, and the CPU each used."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "PY",
    "Stack",
    "WeaverProcess",
    "cpu_seconds",
    "database_for",
    "free_port",
    "local_stack",
    "nats_for",
    "own_cpu",
    "until",
    "wrk",
]

PY = sys.executable
_TESTS = Path(__file__).resolve().parent.parent / "tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(values: list[float]) -> dict[str, float]:
    """p50, p99 and mean of times in milliseconds."""
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 2)

    return {"p50_ms": at(50), "p99_ms": at(99), "mean_ms": round(statistics.fmean(values), 2)}


def database_cpu_seconds() -> float:
    """CPU time so far of the PostgreSQL server processes on this machine (the benchmark's
    own server; its backends that ended count in their parent's): 0 with SQLite, whose work
    is Weaver's own."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, _, rest = text.partition("(")[2].rpartition(")")
        if name == "postgres":
            fields = rest.split()
            total += sum(int(value) for value in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def until(check: Any, timeout: float, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (httpx.HTTPError, OSError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(what or str(check))
        time.sleep(0.05)


def _server_pids(data: Path) -> list[int]:
    """The PostgreSQL server of data directory `data`: its postmaster and their children."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                pids.append(int(stat.parent.name))
    return pids


def own_cpu(cpu: int | None) -> None:
    """With `cpu`, this process and all it starts from now on (Weaver, the load, the nodes)
    keep off that CPU, which is left to the database: as in production, where PostgreSQL
    has cores of its own. SQLite runs are given the same: Weaver's share is then the same."""
    if cpu is None:
        return
    others = set(range(os.cpu_count() or 1)) - {cpu}
    if cpu not in os.sched_getaffinity(0) or not others:
        raise SystemExit(f"--database-cpu {cpu}: this machine has no such CPU to set apart")
    os.sched_setaffinity(0, others)


@contextlib.contextmanager
def database_for(store: str, cpu: int | None = None) -> Iterator[str | None]:
    """The database URL for `store`: None for Weaver's own SQLite file, or a fresh database
    on a private PostgreSQL server (tuned as the tests tune it: no fsync) for `postgresql`,
    its processes (and the backends they start) on `cpu` alone when given (`own_cpu`)."""
    if store == "sqlite":
        yield None
        return
    sys.path.insert(0, str(_TESTS))
    from support.postgres import Postgres, postgres_binaries

    binaries = postgres_binaries()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed: scripts/test installs it")
    server = Postgres(binaries).start()
    if cpu is not None:
        for pid in _server_pids(server.data):  # the backends to come inherit it
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, {cpu})
    try:
        yield server.create_database()
    finally:
        server.stop()


@contextlib.contextmanager
def nats_for(replicas: int) -> Iterator[dict[str, str]]:
    """The settings that join `replicas` Weavers by a private NATS server (the tests' own);
    none for one."""
    if replicas <= 1:
        yield {}
        return
    sys.path.insert(0, str(_TESTS))
    from support.nats import NatsServer, nats_binary

    binary = nats_binary()
    if binary is None:
        raise SystemExit("nats-server is not installed: scripts/test installs it")
    server = NatsServer(binary).start()
    try:
        yield {"nats_url": server.url, "nats_stream": server.new_stream()}
    finally:
        server.stop()


class WeaverProcess:
    """`treadle weaver` on a free port, its settings as TREADLE_* variables."""

    def __init__(self, home: Path, database_url: str | None, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
        env.update({f"TREADLE_{k.upper()}": v for k, v in settings.items()})
        if database_url:
            env["TREADLE_DATABASE_URL"] = database_url
        self.env = env
        argv = [PY, "-m", "treadle", "weaver", "--home", str(home), "--port", str(self.port)]
        self.log = (home.parent / f"{home.name}.log").open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        until(
            lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200,
            60,
            "Weaver to answer",
        )
        self.key = (home / "admin.key").read_text().strip()
        self.token = (home / "join.token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def allow_process_tier(self) -> None:
        with self.client() as api:
            tenant = next(t for t in api.get("/v1/tenants").json()["items"])
            api.patch(f"/v1/tenants/{tenant['id']}", json={"allow_process_tier": True})

    def connected_nodes(self) -> int:
        with self.client() as api:
            nodes = api.get("/v1/nodes").json()["items"]
        return sum(1 for node in nodes if node["connected"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Stack:
    def __init__(self, weaver: WeaverProcess, shuttle: subprocess.Popen[bytes] | None) -> None:
        self.weaver = weaver
        self.shuttle = shuttle


@contextlib.contextmanager
def local_stack(store: str, *, shuttle: bool = True) -> Iterator[Stack]:
    """Weaver on `store` and, with `shuttle`, one real Shuttle offering the process tier (as
    `treadle up --allow-process-runtime` would), for the admin's tenant."""
    with database_for(store) as url, tempfile.TemporaryDirectory(prefix="treadle-bench-") as tmp:
        root = Path(tmp)
        weaver = WeaverProcess(root / "weaver", url, default_min_isolation="process")
        node: subprocess.Popen[bytes] | None = None
        try:
            weaver.allow_process_tier()
            if shuttle:
                env = dict(weaver.env, TREADLE_SHUTTLE_TOKEN=weaver.token)
                argv = [PY, "-m", "treadle", "shuttle", "--weaver", weaver.url]
                argv += ["--home", str(root / "node"), "--allow-process-runtime"]
                log = (root / "node.log").open("ab")
                node = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                until(weaver.connected_nodes, 60, "the Shuttle to join")
            yield Stack(weaver, node)
        finally:
            if node is not None:
                node.terminate()
                node.wait(30)
            weaver.stop()


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%s"
"""


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


async def wrk(
    url: str, headers: dict[str, str], function: str, connections: int, seconds: int
) -> dict[str, Any]:
    """`connections` clients invoking `function` with `?wait` in a closed loop for `seconds`,
    from `wrk` (Debian package `wrk`): requests/s, non-2xx answers, latency percentiles."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT % headers["Authorization"])
        script.flush()
        wrk = await asyncio.create_subprocess_exec(
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            script.name,
            f"{url}/v1/functions/{function}/invoke?wait=60",
            stdout=asyncio.subprocess.PIPE,
        )
        out = (await wrk.communicate())[0].decode()
    percentiles = re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)", out, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "requests_per_s": float(requests.group(1)) if requests else 0.0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "latency": {f"p{q}_ms": _ms(value, unit) for q, value, unit in percentiles},
    }
