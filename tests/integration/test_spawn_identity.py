"""Starting a program as a workload's own host ids (what the namespace tier does as root):
the child has exactly those ids and no supplementary group, and Shuttle, every thread of it,
keeps its own."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from treadle.shuttle.runtimes._spawn import identity_unsupported_reason, spawn, spawn_async

pytestmark = pytest.mark.skipif(
    identity_unsupported_reason() is not None, reason=str(identity_unsupported_reason())
)

STATUS = "/bin/cat"


def child_status(ids: tuple[int, int]) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of a child started with `ids`."""
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = spawn(
            STATUS,
            [STATUS, "/proc/self/status"],
            {},
            Path("/"),
            {0: null, 1: out_w, 2: out_w},
            ids=ids,
        )
    finally:
        os.close(out_w)
        os.close(null)
    data = b""
    while chunk := os.read(out_r, 65536):
        data += chunk
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    assert status == 0, data
    fields = dict(line.split(":", 1) for line in data.decode().splitlines())
    return {key: [int(v) for v in fields[key].split()] for key in ("Uid", "Gid", "Groups")}


def test_the_child_has_the_ids_asked_for_and_no_group_of_shuttles() -> None:
    before = (os.getresuid(), os.getresgid(), os.getgroups())
    os.setgroups([0, 4])  # root's groups, which the child must not inherit
    try:
        first = child_status((123_456, 123_457))
        second = child_status((223_456, 223_457))
        after = (os.getresuid(), os.getresgid(), os.getgroups())
    finally:
        os.setgroups(before[2])

    assert first == {"Uid": [123_456] * 4, "Gid": [123_457] * 4, "Groups": []}
    assert second == {"Uid": [223_456] * 4, "Gid": [223_457] * 4, "Groups": []}
    assert after == (before[0], before[1], [0, 4])


def test_the_child_has_no_capability_left() -> None:
    out_r, out_w = os.pipe()
    pid = spawn(STATUS, [STATUS, "/proc/self/status"], {}, Path("/"), {1: out_w}, ids=(5000, 5000))
    os.close(out_w)
    with os.fdopen(out_r) as out:
        caps = {
            k: v.strip() for k, v in (line.split(":", 1) for line in out) if k.startswith("Cap")
        }
    os.waitpid(pid, 0)
    assert caps["CapPrm"] == caps["CapEff"] == caps["CapAmb"] == "0" * 16


def test_other_threads_keep_shuttles_ids_while_a_child_starts() -> None:
    seen: set[tuple[tuple[int, int, int], tuple[int, int, int]]] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add((os.getresuid(), os.getresgid()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for n in range(20):
            child_status((300_000 + n, 300_000 + n))
    finally:
        stop.set()
        watcher.join()
    assert seen == {(os.getresuid(), os.getresgid())}


@pytest.mark.parametrize("ids", [(0, 1000), (1000, 0), (-1, 1000)])
def test_a_privileged_or_invalid_identity_is_refused(ids: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="unprivileged"):
        spawn("/bin/true", ["/bin/true"], {}, Path("/"), {}, ids=ids)


def alive_and_unkilled(tag: str) -> list[int]:
    """Processes with `tag` in their command line that are neither dead (zombies) nor
    about to be (SIGKILL pending)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if tag.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f)
        except OSError:
            continue
        pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
        if status["State"].split()[0] not in ("Z", "X") and not pending >> 8 & 1:
            found.append(int(entry))
    return found


async def test_a_start_cancelled_while_the_child_starts_leaves_no_child() -> None:
    tag = f"treadle-spawn-test-{os.getpid()}"
    null = os.open(os.devnull, os.O_RDWR)
    try:
        task = asyncio.ensure_future(
            spawn_async(
                "/bin/sh",
                ["/bin/sh", "-c", f"exec sleep 1000 {tag}", tag],
                {},
                Path("/"),
                {0: null, 1: null, 2: null},
                ids=(5001, 5001),
            )
        )
        await asyncio.sleep(0)  # the start is under way in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        os.close(null)
    # Killed: gone, a zombie for the orphan reaper, or with SIGKILL pending.
    assert alive_and_unkilled(tag) == []
