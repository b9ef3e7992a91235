"""A desktop sandbox's sidecars (DESIGN §12), started by its node once its agent is up, inside
its boundary and as its user: ctrl (`treadle.guest.ctrl`), which starts the sandbox's X server
(Xvfb), a window manager and the VNC server, then takes the screen and input requests that
Weaver sends to its port. Nothing on the host speaks X: the X server is the tenant's, as is
everything that talks to it.

ctrl runs on the sandbox's own Python (Debian's, with its X and imaging libraries), from the
agent runtime's `libexec/`. It is a service: it does not keep the sandbox from being idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from treadle.domain.desktop import CTRL_PORT, VNC_PORT, DesktopSpec
from treadle.shuttle.live.agent_runtime import LIBEXEC
from treadle.shuttle.live.link import GuestError, GuestLink, GuestProcess, LinkBroken

__all__ = ["DISPLAY", "DesktopFailed", "environment", "start"]

log = logging.getLogger(__name__)

DISPLAY = ":0"
# The sandbox's system Python: ctrl needs the X and imaging libraries installed for it.
PYTHON = "/usr/bin/python3"
_READY_TIMEOUT_S = 30.0
_KEEP = 4096  # of ctrl's stderr, for the reason of a failed start
_MAX_OUTPUT = 1 << 20  # what ctrl may write in all (it writes `ready`, and its warnings)


def environment(env: dict[str, str]) -> dict[str, str]:
    """The environment of a desktop sandbox: what it asked for, and its display."""
    return {"DISPLAY": DISPLAY, **env}


class DesktopFailed(Exception):
    """The desktop did not start; the message says why (what ctrl said)."""


async def start(link: GuestLink, desktop: DesktopSpec) -> asyncio.Task[None]:
    """Start ctrl in the sandbox behind `link` (a GuestLink) and wait until it serves; the
    returned task drains what ctrl writes for as long as it runs."""
    argv = [
        PYTHON,
        "-I",
        f"{LIBEXEC}/ctrl.py",
        "--display",
        DISPLAY,
        "--width",
        str(desktop.width),
        "--height",
        str(desktop.height),
        "--depth",
        str(desktop.depth),
        "--ctrl-port",
        str(CTRL_PORT),
        "--vnc-port",
        str(VNC_PORT),
    ]
    try:
        process: GuestProcess = await link.exec(
            argv, tag="desktop", service=True, env={"DISPLAY": DISPLAY}
        )
    except (GuestError, LinkBroken) as exc:
        raise DesktopFailed(f"cannot start the desktop: {exc}") from None
    said = bytearray()
    output = process.output().__aiter__()
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            tail, seen = b"", 0  # the end of what ctrl wrote, and how much it wrote
            while b"ready\n" not in tail:
                try:
                    stream, data = await anext(output)
                except StopAsyncIteration:
                    end = await process.wait()
                    why = said.decode(errors="replace").strip() or f"it exited ({end})"
                    raise DesktopFailed(f"the desktop did not start: {why}") from None
                if stream == "stdout":
                    seen += len(data)
                    tail = tail[-5:] + data
                    if seen > _MAX_OUTPUT:
                        process.signal(9)
                        raise DesktopFailed("the desktop's ctrl wrote too much before it was ready")
                else:
                    said += data
                    del said[:-_KEEP]
    except TimeoutError:
        process.signal(9)
        raise DesktopFailed(
            f"the desktop did not start within {_READY_TIMEOUT_S:.0f} s: "
            + (said.decode(errors="replace").strip() or "no word from it")
        ) from None
    return asyncio.create_task(_drain(process, output))


async def _drain(process: GuestProcess, output: AsyncIterator[tuple[str, bytes]]) -> None:
    """Read (and drop) what ctrl writes, so that it never waits on a full window; a ctrl
    that writes more than it does (its program is the sandbox's own) is ended, not read on
    at Shuttle's expense."""
    written = 0
    with contextlib.suppress(LinkBroken, GuestError):
        async for _, data in output:
            written += len(data)
            if written > _MAX_OUTPUT:
                log.warning("a desktop's ctrl wrote over %d bytes: ended", _MAX_OUTPUT)
                process.signal(9)
                return
