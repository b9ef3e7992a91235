"""Small X programs that tests run inside a desktop sandbox, on its own python3 with Debian's
python3-xlib: one draws a known pattern, one records the input it receives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from treadle.client import Sandbox

SANDBOX_PYTHON = "/usr/bin/python3"

# A window of one colour at a known place, undecorated (override-redirect): the screenshot
# must show exactly it. argv: x y width height rrggbb
DRAWER = r"""
import sys
from Xlib import X, display
x, y, w, h = (int(a) for a in sys.argv[1:5])
colour = sys.argv[5]
d = display.Display()
screen = d.screen()
rgb = [int(colour[i:i + 2], 16) * 257 for i in (0, 2, 4)]
pixel = screen.default_colormap.alloc_color(*rgb).pixel
window = screen.root.create_window(
    x, y, w, h, 0, screen.root_depth, X.InputOutput, X.CopyFromParent,
    background_pixel=pixel, override_redirect=True, event_mask=X.ExposureMask)
window.map()
while True:
    event = d.next_event()
    if event.type == X.Expose and event.count == 0:
        window.clear_area()
        d.sync()
        print("drawn", flush=True)
"""

# A window over the whole screen that takes the focus and prints each input event it gets as
# a JSON line: presses and releases of buttons and keys (a key as its keysym's name and the
# text it types), with where the pointer was.
RECORDER = r"""
import json, sys
from Xlib import X, XK, display
d = display.Display()
screen = d.screen()
window = screen.root.create_window(0, 0, screen.width_in_pixels, screen.height_in_pixels, 0,
                                   screen.root_depth, X.InputOutput, X.CopyFromParent,
                                   background_pixel=screen.white_pixel, override_redirect=True,
                                   event_mask=X.KeyPressMask | X.KeyReleaseMask | X.ButtonPressMask
                                   | X.ButtonReleaseMask | X.ExposureMask)
window.map()
names = {}
for group in ("latin1", "miscellany", "xkb", "latin2", "greek", "cyrillic", "technical",
              "publishing", "special"):
    try:
        XK.load_keysym_group(group)
    except ImportError:
        pass
for name in dir(XK):
    if name.startswith("XK_"):
        names.setdefault(getattr(XK, name), name[3:])

def text(keysym):
    if keysym == XK.XK_Return:
        return "\n"
    if keysym == XK.XK_Tab:
        return "\t"
    if 0x20 <= keysym <= 0xff:
        return chr(keysym)
    if 0x01000100 <= keysym <= 0x0110ffff:
        return chr(keysym - 0x01000000)
    return ""

ready = False
while True:
    event = d.next_event()
    if event.type == X.MappingNotify:
        d.refresh_keyboard_mapping(event)
    elif event.type == X.Expose and not ready:
        window.set_input_focus(X.RevertToParent, X.CurrentTime)
        d.sync()
        ready = True
        print(json.dumps({"ready": True}), flush=True)
    elif event.type in (X.KeyPress, X.KeyRelease):
        shifted = 1 if event.state & X.ShiftMask else 0
        keysym = d.keycode_to_keysym(event.detail, shifted) or d.keycode_to_keysym(event.detail, 0)
        print(json.dumps({"event": "key_press" if event.type == X.KeyPress else "key_release",
                          "key": names.get(keysym, hex(keysym)), "text": text(keysym),
                          "state": event.state}), flush=True)
    elif event.type in (X.ButtonPress, X.ButtonRelease):
        print(json.dumps({"event": "press" if event.type == X.ButtonPress else "release",
                          "button": event.detail, "x": event.event_x, "y": event.event_y}),
              flush=True)
"""


class Recorder:
    """The recorder running in a sandbox: `events()` reads what it printed so far."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.process = sandbox.exec([SANDBOX_PYTHON, "-c", RECORDER], tag="recorder")
        self._lines = self._read()
        first = next(self._lines)
        assert first == {"ready": True}, first

    def _read(self) -> Iterator[dict[str, Any]]:
        pending = b""
        for stream, data in self.process:
            if stream != "stdout":
                continue
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield json.loads(line)

    def take(self, count: int) -> list[dict[str, Any]]:
        """The next `count` events (waits for them)."""
        return [next(self._lines) for _ in range(count)]

    def take_text(self, length: int) -> list[dict[str, Any]]:
        """The events up to the release of the key that typed the `length`th character
        (modifiers such as Shift come as events of their own, which type nothing)."""
        events: list[dict[str, Any]] = []
        while len(self.typed(events)) < length or events[-1]["event"] != "key_release":
            events.append(next(self._lines))
        while any(e["event"] == "key_press" and not e["text"] for e in events[-1:]):
            events.append(next(self._lines))
        return events

    def typed(self, events: list[dict[str, Any]]) -> str:
        return "".join(e["text"] for e in events if e["event"] == "key_press")

    def close(self) -> None:
        self.process.kill()
        self.process.close()
