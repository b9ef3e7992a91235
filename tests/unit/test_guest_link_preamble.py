"""A VM booted ahead of its workload says, on its channel, that it waits, then reads the
settings the node prefaces the link with: Shuttle's end takes exactly those bytes, in any
pieces, and breaks the link on anything else (the guest is untrusted from here on)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from treadle.guest.vmboot import WAITING, settings_frame
from treadle.protocol.guest import encode_request
from treadle.shuttle.live.link import GuestLink, LinkBroken


class Guest:
    """The guest's ends of a link's two pipes."""

    def __init__(self, preamble: bytes) -> None:
        to_r, to_w = os.pipe()
        from_r, self.writes = os.pipe()
        self.reads = to_r
        self.broken: list[str] = []
        self.link = GuestLink(to_w, from_r, on_broken=self.broken.append, preamble=preamble)

    def end(self) -> None:
        os.close(self.writes)
        self.writes = -1

    def close(self) -> None:
        self.link.close()
        for fd in (self.reads, self.writes):
            if fd >= 0:
                os.close(fd)


async def test_the_preamble_in_pieces_then_the_agent_s_word() -> None:
    guest = Guest(WAITING)
    try:
        ready = encode_request({"ev": "ready", "pid": 1, "uid": 1000})
        pieces = (WAITING[:3], WAITING[3:10], WAITING[10:] + ready[:5])
        for n, piece in enumerate(pieces, 1):
            os.write(guest.writes, piece)
            guest.link._readable()  # what the loop calls when the pipe has bytes: read them
            assert guest.link._booted.done() == (n == len(pieces))
        await asyncio.wait_for(guest.link.booted(), 5)
        frame = settings_frame({"env": {"A": "1"}, "time": 1.5})
        guest.link.preface(frame)
        assert os.read(guest.reads, len(frame)) == frame  # first, and exactly as given
        os.write(guest.writes, ready[5:])
        assert (await asyncio.wait_for(guest.link.ready(), 5)).uid == 1000
        assert guest.broken == []
    finally:
        guest.close()


@pytest.mark.parametrize("said", [b"treadle: booted, waiting for the work", b"x" + WAITING])
async def test_anything_but_the_preamble_breaks_the_link(said: bytes) -> None:
    guest = Guest(WAITING)
    try:
        os.write(guest.writes, said)
        guest.end()
        with pytest.raises(LinkBroken):
            await asyncio.wait_for(guest.link.booted(), 5)
        if said.startswith(WAITING[:1]):
            # A prefix of it is not a lie yet: the guest's end (EOF) is what ends the link.
            assert guest.broken == []
        else:
            assert len(guest.broken) == 1 and "preamble" in guest.broken[0]
        with pytest.raises(LinkBroken):
            await asyncio.wait_for(guest.link.ready(), 5)
    finally:
        guest.close()


def test_a_settings_frame_up_to_its_limit_and_not_one_byte_more() -> None:
    settings = {"env": {"A": "x" * ((1 << 22) - len('{"env": {"A": ""}}'))}}
    frame = settings_frame(settings)
    assert int.from_bytes(frame[:4], "big") == 1 << 22
    assert json.loads(frame[4:]) == settings
    settings["env"]["A"] += "x"
    with pytest.raises(ValueError, match="too large"):
        settings_frame(settings)
