"""The peers, measured the same way on the same machine: Ray, Celery with Redis, and the
floor of a process per task (asyncio spawning `/bin/echo`).

    .venv/bin/pip install -e '.[bench]'     # ray, celery, redis (Python)
    apt-get install redis-server            # Celery's broker
    .venv/bin/python bench/peers.py [--sequential 500] [--tasks 5000] [--only ray,celery,spawn]

Each peer gets the same two questions: sequential (one task, wait for its result, again:
p50/p99 of the round trip) and sustained (submit all `--tasks`, then collect all: tasks/s).
A no-op task (returns 13) for Ray and Celery; `echo 13` for spawn. Ray runs with as many
workers as CPUs, Celery's worker is prefork with concurrency 2. Prints JSON; writes it under
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servers import PY, free_port, summary, until


def timed(call: Callable[[], Any], n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return summary(times)


def ray_peer(sequential: int, tasks: int) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def thirteen() -> int:
            return 13

        ray.get([thirteen.remote() for _ in range(100)])  # workers up
        seq = timed(lambda: ray.get(thirteen.remote()), sequential)
        start = time.perf_counter()
        results = ray.get([thirteen.remote() for _ in range(tasks)])
        elapsed = time.perf_counter() - start
        assert results == [13] * tasks
    finally:
        ray.shutdown()
    return {
        "what": f"Ray {ray.__version__}, f.remote + ray.get",
        "sequential": seq,
        "tasks_per_s": round(tasks / elapsed, 1),
    }


_CELERY_APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    app = Celery("peers", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
    app.conf.worker_prefetch_multiplier = 4

    @app.task
    def thirteen():
        return 13
    """
)


def celery_peer(sequential: int, tasks: int) -> dict[str, Any]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory() as tmp:
        redis = subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        (Path(tmp) / "peers_app.py").write_text(_CELERY_APP)
        env = dict(os.environ, BROKER=broker, PYTHONPATH=tmp)
        argv = [PY, "-m", "celery", "-A", "peers_app", "worker", "-P", "prefork", "-c", "2"]
        argv += ["--loglevel", "warning", "--without-gossip", "--without-mingle"]
        worker = subprocess.Popen(
            argv,
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sys.path.insert(0, tmp)
        os.environ["BROKER"] = broker
        try:
            import celery
            from peers_app import thirteen  # type: ignore[import-not-found]

            until(lambda: thirteen.delay().get(timeout=5) == 13, 60, "the Celery worker")
            seq = timed(lambda: thirteen.delay().get(timeout=30), sequential)
            start = time.perf_counter()
            pending = [thirteen.delay() for _ in range(tasks)]
            results = [p.get(timeout=120) for p in pending]
            elapsed = time.perf_counter() - start
            assert results == [13] * tasks
        finally:
            worker.terminate()
            worker.wait(30)
            redis.terminate()
            redis.wait(30)
    return {
        "what": f"Celery {celery.__version__} + Redis, prefork -c 2, delay + get",
        "sequential": seq,
        "tasks_per_s": round(tasks / elapsed, 1),
    }


async def _spawn_once() -> None:
    process = await asyncio.create_subprocess_exec(
        "/bin/echo", "13", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert out == b"13\n"


async def _spawn(sequential: int, tasks: int, concurrency: int) -> dict[str, Any]:
    times = []
    for _ in range(sequential):
        start = time.perf_counter()
        await _spawn_once()
        times.append((time.perf_counter() - start) * 1000)
    left = tasks

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _spawn_once()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "what": f"asyncio spawn of /bin/echo, {concurrency} at a time",
        "sequential": summary(times),
        "tasks_per_s": round(tasks / elapsed, 1),
    }


def spawn_peer(sequential: int, tasks: int) -> dict[str, Any]:
    return asyncio.run(_spawn(sequential, tasks, concurrency=8))


PEERS = {"ray": ray_peer, "celery": celery_peer, "spawn": spawn_peer}


def measure(only: list[str], sequential: int, tasks: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
    }
    for name in only:
        results[name] = PEERS[name](sequential, tasks)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--only", default="ray,celery,spawn")
    args = parser.parse_args()
    results = measure(args.only.split(","), args.sequential, args.tasks)
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"peers-{int(time.time())}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
