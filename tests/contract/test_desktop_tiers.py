"""A desktop in every tier that can have one: the node starts ctrl (and with it Xvfb, the
window manager and x11vnc) inside the sandbox, and both ctrl and the VNC server answer on
the sandbox's own loopback, reached from inside through the agent. The process tier has no
network of its own, so no desktop (`treadle.domain.sandbox`)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from contract.test_live_sandbox import PARAMS, start
from treadle.domain.desktop import CTRL_PORT, VNC_PORT, DesktopSpec
from treadle.domain.resources import Tier
from treadle.shuttle.live import desktop
from treadle.shuttle.live.box import LiveSandbox
from treadle.shuttle.live.link import GuestError, GuestProcess

pytestmark = pytest.mark.desktop

if not (shutil.which("Xvfb") and Path("/usr/lib/python3/dist-packages/Xlib").is_dir()):
    pytest.skip("Xvfb and python3-xlib are not installed", allow_module_level=True)

TIERS = [param for param in PARAMS if param.values[0][0] != Tier.PROCESS]


@pytest.fixture(params=TIERS)
async def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LiveSandbox]:
    started = await start(request.param, tmp_path, env={"DISPLAY": desktop.DISPLAY})
    try:
        yield started
    finally:
        await started.stop(grace_s=1)


async def call(connection: GuestProcess, output: Any, request: dict[str, Any]) -> tuple:
    body = json.dumps(request).encode()
    await connection.write_stdin(struct.pack(">I", len(body)) + body)
    buffer = bytearray()

    async def read(size: int) -> bytes:
        while len(buffer) < size:
            _, data = await anext(output)
            buffer.extend(data)
        taken = bytes(buffer[:size])
        del buffer[:size]
        return taken

    header_len, payload_len = struct.unpack(">II", await read(8))
    return json.loads(await read(header_len)), await read(payload_len)


async def test_ctrl_and_vnc_serve_from_inside_the_sandbox(sandbox: LiveSandbox) -> None:
    drained = await desktop.start(sandbox.link, DesktopSpec(width=320, height=200))
    try:
        ctrl = await sandbox.link.connect(CTRL_PORT)
        output = ctrl.output().__aiter__()
        header, image = await call(
            ctrl,
            output,
            {
                "actions": [{"type": "move", "x": 30, "y": 40}, {"type": "cursor"}],
                "screenshot": {"format": "png"},
            },
        )
        assert header["ok"] and header["results"][1] == [30, 40], header
        assert Image.open(io.BytesIO(image)).size == (320, 200)
        ctrl.signal(15)

        vnc = await sandbox.link.connect(VNC_PORT)
        _, banner = await anext(vnc.output().__aiter__())
        assert banner.startswith(b"RFB 003.")
        vnc.signal(15)

        # Its processes are services: the sandbox has no work running.
        seen = await sandbox.link.call("activity")
        assert seen["processes"] == 0, seen
    finally:
        drained.cancel()


async def test_a_desktop_that_cannot_start_says_why(sandbox: LiveSandbox) -> None:
    # The display is taken: ctrl's Xvfb cannot have it.
    blocker = await sandbox.link.exec(["Xvfb", desktop.DISPLAY, "-nolisten", "tcp"])
    for _ in range(400):  # until it serves (its socket is there), 20 s at most
        try:
            await sandbox.link.call("stat", path="/tmp/.X11-unix/X0")
            break
        except GuestError:
            await asyncio.sleep(0.05)
    try:
        with pytest.raises(desktop.DesktopFailed, match="did not start"):
            await desktop.start(sandbox.link, DesktopSpec(width=320, height=200))
    finally:
        blocker.signal(9)
