"""`treadle up`: one command gives a working Weaver and local Shuttle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

from support.cluster import eventually, free_port
from support.processes import pids_with
from treadle.shuttle.microvm.image import find_package


def _shuttle_pids(home: Path) -> list[int]:
    return pids_with(str(home / "shuttle"))


def _start_up(
    tmp_path: Path, *options: str, **settings: str
) -> tuple[subprocess.Popen[bytes], Path, int, dict[str, str], Path]:
    """`treadle up` on a free port with its own home, once it says it is ready; `settings`
    are more environment variables (its Shuttle's too)."""
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
    env.update(TREADLE_HOME=str(home), TREADLE_URL=f"http://127.0.0.1:{port}", **settings)
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "treadle", "up", "--port", str(port), *options],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        eventually(lambda: "Press Ctrl-C" in log.read_text(), timeout=60, what="treadle up")
    except AssertionError:
        up.kill()
        raise AssertionError(log.read_text()) from None
    return up, home, port, env, log


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _banner_line(banner: str, label: str) -> str:
    return next(line for line in banner.splitlines() if line.strip().startswith(label))


# Prints the admin key's first line if it can read it; the exit code says whether it could.
PEEK = 'python3 -c "import sys; print(open(sys.argv[1]).readline())" {path}'


def test_up_runs_the_quickstart_and_stops_cleanly(tmp_path: Path) -> None:
    up, home, port, env, log = _start_up(tmp_path)
    try:
        banner = log.read_text()
        assert f"http://127.0.0.1:{port}" in banner
        assert str(home / "admin.key") in banner
        assert stat.S_IMODE((home / "admin.key").stat().st_mode) == 0o600
        assert (home / "join.token").exists()

        assert (
            _cli(env, "fn", "create", "add", "--command", 'python3 -c "print(4 + 9)"').returncode
            == 0
        )
        result = _cli(env, "invoke", "add")
        assert (result.returncode, result.stdout) == (0, "13\n")
        assert _shuttle_pids(home)
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=30)
    assert code == 0, log.read_text()
    assert _shuttle_pids(home) == []


def test_up_offers_no_process_tier_and_runs_functions_isolated(tmp_path: Path) -> None:
    up, home, _port, env, log = _start_up(tmp_path)
    try:
        banner = log.read_text()
        offered = _banner_line(banner, "runtime tiers:")
        assert "process" not in offered and "namespace" in offered, banner
        # The microvm tier wherever it works: QEMU and the guest's kernel package here.
        microvm = shutil.which("qemu-system-x86_64") is not None and find_package() is not None
        assert ("microvm" in offered) == microvm, banner
        assert _banner_line(banner, "default tier:").split()[2] == "namespace", banner
        assert "warning" not in banner, banner
        node = json.loads(_cli(env, "nodes", "--json").stdout)[0]
        assert "process" not in node["runtimes"]

        key = (home / "admin.key").read_text()
        _cli(env, "fn", "create", "peek", "--command", PEEK.format(path=home / "admin.key"))
        peek = _cli(env, "invoke", "peek")
        assert peek.returncode != 0 and key not in peek.stdout + peek.stderr, peek
        uid_map = "python3 -c \"print(open('/proc/self/uid_map').read().split())\""
        _cli(env, "fn", "create", "who", "--command", uid_map)
        who = _cli(env, "invoke", "who")
        assert who.returncode == 0 and who.stdout != "['0', '0', '4294967295']\n", who
        refused = _cli(env, "fn", "create", "raw", "-c", "true", "--isolation", "process")
        assert refused.returncode == 1 and "tenant allow-process" in refused.stderr, refused
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=30)


def test_up_offers_the_process_tier_only_when_asked_and_says_what_it_exposes(
    tmp_path: Path,
) -> None:
    up, home, _port, env, log = _start_up(tmp_path, "--allow-process-runtime")
    try:
        banner = log.read_text()
        assert "process" in _banner_line(banner, "runtime tiers:"), banner
        warning = _banner_line(banner, "warning: the process tier isolates nothing")
        assert str(home) in warning
        peek = ["fn", "create", "peek", "--isolation", "process"]
        peek += ["--command", PEEK.format(path=home / "admin.key")]
        refused = _cli(env, *peek)
        assert refused.returncode == 1 and "tenant allow-process" in refused.stderr, refused

        allowed = _cli(env, "tenant", "allow-process", "default")
        assert allowed.returncode == 0, allowed
        assert _cli(env, *peek).returncode == 0
        # What the warning says: code in the process tier reads Weaver's files.
        result = _cli(env, "invoke", "peek")
        assert result.stdout.strip() == (home / "admin.key").read_text().strip(), result
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=30)


def test_up_says_when_its_node_has_no_isolating_tier(tmp_path: Path) -> None:
    only_process = {"TREADLE_SHUTTLE_RUNTIMES": '["process"]'}
    up, _home, _port, _env, log = _start_up(tmp_path, "--allow-process-runtime", **only_process)
    try:
        banner = log.read_text()
        assert _banner_line(banner, "runtime tiers:").split(":")[1].strip() == "process"
        assert "warning: no isolating tier here" in banner
        assert "apt-get install bubblewrap" in banner
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=30)


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, TREADLE_HOME=str(tmp_path))
        result = subprocess.run(
            [sys.executable, "-m", "treadle", "up", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "already in use" in result.stderr


def test_local_shuttle_ends_with_up_even_when_up_is_killed(tmp_path: Path) -> None:
    up, home, _port, _env, _log = _start_up(tmp_path)
    try:
        assert _shuttle_pids(home)
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=30)
        eventually(lambda: not _shuttle_pids(home), timeout=30, what="the shuttle to exit")
    finally:
        if up.poll() is None:
            up.kill()
