"""The guest agent's terminal processes: output a process wrote just before it exited is
sent, even when its exit is seen before its terminal is read."""

from __future__ import annotations

import os
import selectors
import shutil
from pathlib import Path
from typing import Any

from treadle.guest.agent import Process


class _Channel:
    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], bytes]] = []

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sent.append((header, payload))


class _Agent:
    """What a Process uses of the agent: no user switch, a selector never run here."""

    def __init__(self, home: Path) -> None:
        self.acting = None
        self.base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.acting_env: dict[str, str] = {}
        self.home = str(home)
        self.selector = selectors.DefaultSelector()
        self.channel = _Channel()
        self.switches = False
        self.processes: dict[int, Process] = {}
        self.by_os_pid: dict[int, Process] = {}


def test_a_terminal_s_last_output_is_sent_when_its_exit_is_seen_first(tmp_path: Path) -> None:
    agent = _Agent(tmp_path)
    argv = [shutil.which("sh") or "/bin/sh", "-c", "stty size"]
    process = Process(agent, 7, {"argv": argv, "pty": {"rows": 33, "cols": 101}})  # type: ignore[arg-type]
    agent.processes[7] = process
    # The exit reaped before the selector ever ran: the output is still in the terminal.
    _, status = os.waitpid(process.os_pid, 0)
    process.reaped(status)
    out = b"".join(payload for header, payload in agent.channel.sent if header["ev"] == "out")
    assert out.split() == [b"33", b"101"]
    assert [header["ev"] for header, _ in agent.channel.sent][-1] == "exit"
    agent.selector.close()
