"""`treadle up`: one command gives a working Weaver and local Shuttle."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from support.cluster import eventually, free_port
from support.processes import pids_with


def _shuttle_pids(home: Path) -> list[int]:
    return pids_with(str(home / "shuttle"))


def _start_up(
    tmp_path: Path,
) -> tuple[subprocess.Popen[bytes], Path, int, dict[str, str], Path]:
    """`treadle up` on a free port with its own home, once it says it is ready."""
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
    env.update(TREADLE_HOME=str(home), TREADLE_URL=f"http://127.0.0.1:{port}")
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "treadle", "up", "--port", str(port)],
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


def test_up_runs_the_quickstart_and_stops_cleanly(tmp_path: Path) -> None:
    up, home, port, env, log = _start_up(tmp_path)
    try:
        banner = log.read_text()
        assert f"http://127.0.0.1:{port}" in banner
        assert "runtime tier:  process" in banner
        assert str(home / "admin.key") in banner
        assert stat.S_IMODE((home / "admin.key").stat().st_mode) == 0o600
        assert (home / "join.token").exists()

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "treadle", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        assert cli("fn", "create", "add", "--command", 'python3 -c "print(4 + 9)"').returncode == 0
        result = cli("invoke", "add")
        assert (result.returncode, result.stdout) == (0, "13\n")
        assert _shuttle_pids(home)
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=30)
    assert code == 0, log.read_text()
    assert _shuttle_pids(home) == []


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
