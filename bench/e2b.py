"""The cost of the E2B surface: the same operations through the stock `e2b` SDK (envd's
Connect-RPC and E2B's REST, served by Weaver) and through treadle's own SDK, in one run,
against one Weaver, side by side.

    .venv/bin/python bench/e2b.py [--url URL] [-n 20] [--commands 100] [--e2b 2.63]

Against a running treadle (e.g. `treadle up`; the admin key is found as the CLI finds it),
each client in a process of its own (the e2b SDK from `.e2b/<version>`, installed by
`scripts/e2b-sdks`), one after the other, on sandboxes without network:

  * `create_to_first_command`: create, then run `true` (which waits for the sandbox to run),
    `-n` times, one after another;
  * `command_round_trip`: `/bin/bash -l -c true` (how the e2b SDK runs every command) run
    `--commands` times in one running sandbox; treadle's also as plain `true`;
  * `file_1mib_write` / `file_1mib_read`: a 1 MiB file written then read, `-n` times.

Prints JSON: p50/p95 in ms per client, and the ratio e2b / treadle of the p50s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The same measurements, written once for both clients: `make(...)` creates a sandbox,
# `run(sbx, cmd)`, `write`/`read` a file, `kill(sbx)`.
_MEASURE = """
import json, sys, time

def timed(call):
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000

def measure(n, commands, make, run, write, read, kill, plain=None):
    seen = {"create_to_first_command": [], "command_round_trip": [], "file_1mib_write": [],
            "file_1mib_read": []}
    warm = make(); run(warm, "true"); kill(warm)
    for _ in range(n):
        box = []
        seen["create_to_first_command"].append(timed(lambda: (box.append(make()),
                                                               run(box[0], "true"))))
        kill(box[0])
    sbx = make()
    run(sbx, "true")
    for _ in range(commands):
        seen["command_round_trip"].append(timed(lambda: run(sbx, "true")))
    if plain is not None:
        seen["command_round_trip_plain"] = [timed(lambda: plain(sbx)) for _ in range(commands)]
    data = bytes(range(256)) * 4096
    for i in range(n):
        seen["file_1mib_write"].append(timed(lambda: write(sbx, f"f{i}.bin", data)))
        got = []
        seen["file_1mib_read"].append(timed(lambda: got.append(read(sbx, f"f{i}.bin"))))
        assert got[0] == data
    kill(sbx)
    print(json.dumps(seen))
"""

_E2B = """
from e2b import Sandbox
measure(
    int(sys.argv[1]), int(sys.argv[2]),
    make=lambda: Sandbox.create(allow_internet_access=False, timeout=600),
    run=lambda sbx, cmd: sbx.commands.run(cmd),
    write=lambda sbx, path, data: sbx.files.write(path, data),
    read=lambda sbx, path: bytes(sbx.files.read(path, format="bytes")),
    kill=lambda sbx: sbx.kill(),
)
"""

_TREADLE = """
from treadle import Sandbox
def run(sbx, cmd):
    assert sbx.run(["/bin/bash", "-l", "-c", cmd]).exit_code == 0
measure(
    int(sys.argv[1]), int(sys.argv[2]),
    make=lambda: Sandbox.create(timeout=600),
    run=run,
    write=lambda sbx, path, data: sbx.files.write(path, data),
    read=lambda sbx, path: sbx.files.read(path),
    kill=lambda sbx: sbx.kill(),
    plain=lambda sbx: sbx.run(["true"]),
)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "n": len(values),
    }


def _client(python: str, program: str, env: dict[str, str], n: int, commands: int) -> Any:
    done = subprocess.run(
        [python, "-I", "-c", _MEASURE + program, str(n), str(commands)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(f"{python}: rc {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--commands", type=int, default=100)
    parser.add_argument("--e2b", default="2.63", help="the SDK in .e2b/<version>")
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from treadle.client.config import load_config

    config = load_config(url=options.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "TREADLE_"))}
    env.update(TREADLE_URL=config.url, TREADLE_API_KEY=config.api_key or "")
    env.update(E2B_API_URL=config.url, E2B_SANDBOX_URL=config.url, E2B_API_KEY=config.api_key or "")
    python = ROOT / ".e2b" / options.e2b / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run scripts/e2b-sdks")
    started = time.time()
    treadle = _client(sys.executable, _TREADLE, env, options.n, options.commands)
    e2b = _client(str(python), _E2B, env, options.n, options.commands)
    result: dict[str, Any] = {"url": config.url, "e2b_sdk": options.e2b}
    for name, values in e2b.items():
        ours = _summary(treadle[name])
        theirs = _summary(values)
        result[name] = {
            "e2b_sdk": theirs,
            "treadle_sdk": ours,
            "ratio_p50": round(theirs["p50_ms"] / ours["p50_ms"], 2) if ours["p50_ms"] else None,
        }
    result["command_round_trip_plain_true_treadle"] = _summary(treadle["command_round_trip_plain"])
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
