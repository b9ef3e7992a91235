"""`sudo` in a sandbox made with it (`treadle.guest.sudo`), on every tier with users of its
own: the sandbox's user becomes the sandbox's root (or another of its users), with its own
stdin, stdout and stderr, the command's exit status and signals going both ways; no one else
may, and a caller that goes away takes its command with it. The agent's socket stands up to
what the sandbox's own processes may send it."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contract.test_live_sandbox import PARAMS, _capability_mask, _status, run, start
from treadle.domain.resources import Tier
from treadle.shuttle.live.box import LiveSandbox
from treadle.shuttle.sandbox.policy import ROOT_CAPABILITIES

WITH_USERS = [param for param in PARAMS if param.values[0][0] != Tier.PROCESS]


@pytest.fixture(params=WITH_USERS)
async def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LiveSandbox]:
    started = await start(request.param, tmp_path, sudo=True, home="/home/user")
    try:
        yield started
    finally:
        await started.stop(grace_s=1)


async def sh(sandbox: LiveSandbox, script: str, **options: Any) -> tuple[str, str, Any]:
    out, err, end = await run(sandbox, ["sh", "-c", script], **options)
    return out.decode(), err.decode(), end


async def test_the_sandbox_s_user_becomes_its_root(sandbox: LiveSandbox) -> None:
    out, err, end = await sh(sandbox, "sudo grep -E '^(Uid|Gid|CapEff):' /proc/self/status")
    assert end.exit_code == 0, err
    root = _status(out)
    assert root["Uid"].split() == ["0"] * 4 and root["Gid"].split() == ["0"] * 4
    # Exactly what an exec as root gets: the sandbox's root, nothing of the host's.
    assert int(root["CapEff"], 16) == _capability_mask(ROOT_CAPABILITIES)

    out, err, end = await sh(sandbox, "sudo -u nobody id -u; sudo -u '#1000' id -u")
    assert (end.exit_code, out.split()) == (0, ["65534", "1000"]), err

    # What only root may do: a file of root's, 0600, read back by root alone.
    script = "sudo sh -c 'echo secret > /tmp/root-only; chmod 600 /tmp/root-only'; "
    script += (
        "cat /tmp/root-only; echo $?; sudo cat /tmp/root-only; find /tmp/root-only -printf '%U'"
    )
    out, err, _ = await sh(sandbox, script)
    assert out.split() == ["1", "secret", "0"], err


async def test_stdio_exit_status_and_environment_are_the_caller_s(sandbox: LiveSandbox) -> None:
    out, err, end = await sh(sandbox, "printf 'in\\n' | sudo cat; sudo sh -c 'echo to-err >&2'")
    assert (out, err, end.exit_code) == ("in\n", "to-err\n", 0)
    _, _, end = await sh(sandbox, "sudo sh -c 'exit 7'")
    assert end.exit_code == 7
    out, _, end = await sh(sandbox, "sudo sh -c 'kill -TERM $$'; echo $?")
    assert out == f"{128 + signal.SIGTERM}\n"
    _, err, end = await sh(sandbox, "sudo no-such-program")
    assert end.exit_code == 127 and "no-such-program" in err

    # sudo's env_reset: the caller's variables go unless -E keeps them; HOME, USER and the
    # SUDO_* variables are the target's and the caller's; VAR=value sets one.
    env = {"MINE": "kept?", "TERM": "xterm"}
    script = "cd /tmp && sudo env; echo --; sudo -E env; echo --; sudo X=1 env; echo --; sudo pwd"
    out, _, _ = await sh(sandbox, script, env=env)
    plain, kept, assigned = (_vars(part) for part in out.split("--\n")[:3])
    assert "MINE" not in plain and plain["TERM"] == "xterm" and plain["GREETING"] == "hello"
    assert (plain["USER"], plain["SUDO_USER"], plain["SUDO_UID"]) == ("root", "user", "1000")
    assert plain["HOME"] == "/home/user"  # root's own home is not in the sandbox
    assert kept["MINE"] == "kept?" and kept["USER"] == "root"
    assert assigned["X"] == "1"
    assert out.endswith("--\n/tmp\n")  # the caller's directory
    out, _, _ = await sh(sandbox, "cd /tmp && sudo -i pwd")
    assert out == "/home/user\n"  # a login: the target's home


async def test_no_one_but_the_sandbox_s_user_and_root_may(sandbox: LiveSandbox) -> None:
    out, err, end = await sh(sandbox, "sudo id -u", user="nobody", cwd="/tmp")
    assert (out, end.exit_code) == ("", 1)
    assert "nobody is not in the sudoers file" in err
    out, _, end = await sh(sandbox, "sudo id -u", user="root")
    assert (out, end.exit_code) == ("0\n", 0)


async def test_signals_are_forwarded_and_a_caller_that_dies_takes_its_command(
    sandbox: LiveSandbox,
) -> None:
    process = await sandbox.link.exec(["sudo", "sleep", "600"])
    await _until(sandbox, "sleep 600", present=True)
    process.signal(signal.SIGTERM)  # to sudo: forwarded to its command
    end = await process.wait()
    assert end.signal == signal.SIGTERM
    await _until(sandbox, "sleep 600", present=False)

    process = await sandbox.link.exec(["sudo", "sleep", "601"])
    await _until(sandbox, "sleep 601", present=True)
    process.signal(signal.SIGKILL)  # sudo itself dies: its command goes with it
    await process.wait()
    await _until(sandbox, "sleep 601", present=False)


async def test_a_sandbox_made_without_it_has_no_sudo(tmp_path: Path) -> None:
    param = WITH_USERS[0].values[0]
    sandbox = await start(param, tmp_path)
    try:
        out, _, end = await sh(sandbox, "sudo id -u")
        assert end.exit_code != 0 and out == ""
        # Its socket is not there to reach by hand either.
        probe = "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
        probe += "s.connect('\\0treadle/sudo')"
        _, err, end = await run(sandbox, ["python3", "-c", probe])
        assert end.exit_code == 1 and b"ConnectionRefusedError" in err
    finally:
        await sandbox.stop(grace_s=1)


# What a process in the sandbox can throw at the agent's socket by hand.
HOSTILE = r"""
import array, json, os, socket, time
name = "\0treadle/sudo"
STDIO = array.array("i", [0, 1, 2]).tobytes()

def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for _ in range(1000):
        try:
            s.connect(name)
            return s
        except BlockingIOError:  # gVisor's answer to a full backlog
            time.sleep(0.01)
    raise TimeoutError("the agent takes no connection")

def answer(s):
    return json.loads(s.recv(65536) or b'{"closed": true}')

def ours():  # as the sandbox's sudo sends them: stdio and our credentials
    mine = array.array("i", [os.getpid(), os.getuid(), os.getgid()])
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, STDIO),
            (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, mine)]

results = []
s = conn(); s.send(b"not json"); results.append(answer(s))
s = conn(); s.send(json.dumps({"argv": ["id"], "user": "root"}).encode())  # no fds
results.append(answer(s))
s = conn()
s.sendmsg([json.dumps({"argv": [], "user": "root", "cwd": "/"}).encode()], ours())
results.append(answer(s))
s = conn()
bad = {"argv": ["id"], "user": "no-such-user", "cwd": "/"}
s.sendmsg([json.dumps(bad).encode()], ours())
results.append(answer(s))
s = conn(); s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
try:
    s.send(b"x" * (200 * 1024)); results.append(answer(s))
except OSError as exc:
    results.append({"refused": exc.errno})
# Credentials that are not ours: pid 1's, and the sandbox's user's when we are not it.
s = conn()
try:
    s.sendmsg([json.dumps({"argv": ["id"], "user": "root", "cwd": "/"}).encode()],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, STDIO),
               (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, array.array("i", [1, 1000, 1000]))])
    results.append(answer(s))
except PermissionError:
    results.append({"refused": "EPERM"})
# Connections held open without a word: past the limit the oldest of them are let go, and
# the agent stays up.
del s
held = [conn() for _ in range(70)]
refused = 0
for s in held[:6]:
    s.settimeout(5)
    got = answer(s)
    refused += "too many" in got.get("error", "")
results.append({"refused_sessions": refused})
print(json.dumps(results))
for s in held:
    s.close()
"""


@pytest.mark.parametrize("caller", ["user", "nobody"])
async def test_the_agent_s_socket_withstands_its_own_sandbox(
    sandbox: LiveSandbox, caller: str
) -> None:
    out, err, end = await run(sandbox, ["python3", "-c", HOSTILE], user=caller, cwd="/tmp")
    assert end.exit_code == 0, err
    results = json.loads(out)
    # Every request is answered, and refused.
    for answer in results[:6]:
        assert "error" in answer or "refused" in answer, results
    if caller == "user":
        assert "no user 'no-such-user'" in results[3]["error"]
    else:
        assert all("not in the sudoers" in r.get("error", "") for r in results[:4]), results
    # Credentials not one's own: the kernel refuses them, or they are not believed.
    assert results[5] == {"refused": "EPERM"} or "not in the sudoers" in results[5]["error"]
    assert results[6]["refused_sessions"] == 6
    # And the agent goes on as before.
    out, _, end = await sh(sandbox, "sudo id -u")
    assert (out, end.exit_code) == ("0\n", 0)


def _vars(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


async def _until(sandbox: LiveSandbox, command: str, *, present: bool) -> None:
    """Wait until a process whose command line is `command` is (or is no longer) in the
    sandbox; fails after 10 s."""
    for _ in range(200):
        out, _, _ = await run(sandbox, ["ps", "-eo", "args"], user="root")
        if (command in out.decode().splitlines()) == present:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{command!r} is {'not ' if present else 'still '}there")
