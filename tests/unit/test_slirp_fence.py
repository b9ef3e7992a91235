"""The network fence's wait for its helper (`slirp._exit_code`): a helper that outlives the
fence's timeout is killed and reaped, on the loop Shuttle runs (uvloop), whose readers leave a
pidfd non-blocking."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest
import uvloop

from treadle.shuttle.runtimes import slirp


def test_a_helper_past_the_timeout_is_killed_and_its_exit_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(slirp, "_FENCE_TIMEOUT_S", 0.2)
    # Popen only starts it: `_exit_code` reaps it, as the fence does its helper. It holds
    # 512 MiB, so that it takes a while to end once killed: a wait that does not block on a
    # child still ending (a non-blocking pidfd's) then shows.
    hold = "import sys, time; b = bytearray(512 << 20); print(flush=True); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE)
    assert child.stdout is not None
    with child.stdout:
        child.stdout.readline()  # its memory is taken
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(slirp._exit_code(child.pid))
    assert code == -signal.SIGKILL
    child.returncode = code  # reaped already: Popen must not wait for it again
