"""The ctrl sidecar of a desktop sandbox: a virtual screen, and input and capture over TCP.

It runs inside the sandbox, started by the system interpreter as

    /usr/bin/python3 -I ctrl.py --width 1280 --height 800 --depth 24 \\
        --ctrl-port 49990 [--vnc-port 5900] [--display :0] [--log FILE]

It starts `Xvfb` (and a light window manager and `x11vnc` where they are installed), connects
to the X server with python-xlib, and serves the control plane on 127.0.0.1:<ctrl-port>. It
never starts a process per action: input goes through the X server's XTEST extension, capture
through `GetImage` on the root window, both in this process; PIL encodes the images. It uses
the standard library otherwise and nothing of treadle (Debian's `python3-xlib` and
`python3-pil` are the only packages it needs). It prints `ready` on stdout once it listens.

Wire protocol (one connection carries any number of requests, one after another):

- request: a 4-byte big-endian length, then that many bytes of UTF-8 JSON (an object, at most
  1 MiB; a longer one is answered with an error and the connection closed);
- reply: 8 bytes (`>II`: the length of a JSON header, the length of a binary payload), the
  header (UTF-8 JSON object), then the payload (an encoded image, or nothing).

A request is `{"actions": [...], "screenshot": null | {...}}`. Every action is checked before
the first one runs: a bad one fails the whole request, nothing done. A success answers
`{"ok": true, "results": [...], "cursor": [x, y], "screenshot": {...}}` (one result per action,
`screenshot` only when one was asked for); a failure `{"ok": false, "error": text, "index": i}`
(`index` when an action is to blame). See `_parse_action` and `Shot` for the fields.

Keys: a keysym at level 0 of a key of the current keymap is sent with that key; in `type`, one
at level 1 (capitals, shifted punctuation) with that key and Shift; any other (and any key of
`key`/`key_down`/`key_up` not at level 0, so that a chord carries no modifier it did not name)
with a spare keycode (one the keymap leaves empty, 19 of them in Xvfb's) bound to that keysym
alone. The bindings stay in place for later requests and are reused least recently used first:
undoing them at once would race the program the keys go to, which reads the keymap when it
handles the event, possibly after the binding is gone. For the same reason a binding is only
replaced once its last use is `REBIND_GAP` seconds old: text with more distinct characters
outside the keymap than there are spare keycodes pauses that long every so many characters.
A Caps Lock left on changes the case of what `type` types.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

try:
    from PIL import Image, ImageChops, ImageDraw  # type: ignore[import-not-found, unused-ignore]
    from Xlib import XK, X  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from Xlib import display as xdisplay  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from Xlib import error as xerror  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from Xlib.ext import xtest  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError as _exc:  # pragma: no cover - depends on the sandbox's image
    sys.stderr.write(f"ctrl: needs python3-xlib and python3-pil: {_exc}\n")
    raise SystemExit(1) from None

BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
HEADER = struct.Struct(">II")
LENGTH = struct.Struct(">I")
MAX_REQUEST = 1 << 20
MAX_ACTIONS = 10_000
MAX_CONNECTIONS = 64
MAX_TEXT = 100_000
XVFB_TIMEOUT = 20.0
WM_TIMEOUT = 3.0
VNC_TIMEOUT = 15.0
# A child that ends is started again (`Children.keep`) after a pause: its first, its longest.
KEEP_FIRST_PAUSE = 0.2
KEEP_MAX_PAUSE = 30.0
# A spare keycode is bound to another keysym only once its last use is this old (seconds).
REBIND_GAP = 0.5
# GetImage in strips of about this many bytes: python-xlib joins what it reads chunk after
# chunk, which costs quadratic time on one large reply.
STRIP_BYTES = 256 * 1024

BUTTONS = {"left": 1, "middle": 2, "right": 3}
FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg"}
# Keysyms for the control characters that have a key.
CONTROL_KEYSYMS = {
    "\n": 0xFF0D,  # Return
    "\r": 0xFF0D,
    "\t": 0xFF09,  # Tab
    "\b": 0xFF08,  # BackSpace
    "\x1b": 0xFF1B,  # Escape
    "\x7f": 0xFFFF,  # Delete
}
KEYSYM_GROUPS = (
    "latin2",
    "latin3",
    "latin4",
    "greek",
    "cyrillic",
    "katakana",
    "arabic",
    "hebrew",
    "thai",
    "korean",
    "technical",
    "special",
    "publishing",
    "apl",
    "xkb",
    "xf86",
)
SHIFT_L = 0xFFE1
# The pointer drawn into an image that asks for it: an arrow, tip at (0, 0).
ARROW = [(0, 0), (0, 17), (4, 13), (7, 20), (10, 19), (7, 12), (12, 12)]


class RequestError(Exception):
    """A request this sidecar answers with `ok: false`."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class FatalXError(Exception):
    """The connection to the X server is gone."""


# --- requests ------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(obj: dict[str, Any], key: str, *, default: Any = None, lo: int, hi: int) -> int:
    v = obj.get(key, default)
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        v = int(v)
    if not _is_int(v):
        raise RequestError(f"{key!r} must be an integer")
    if not lo <= v <= hi:
        raise RequestError(f"{key!r} must be between {lo} and {hi}")
    return int(v)


def _coord(v: Any, what: str) -> int:
    if isinstance(v, float) and math.isfinite(v):
        return round(v)
    if not _is_int(v):
        raise RequestError(f"{what} must be an integer")
    return int(v)


def _point(obj: dict[str, Any], required: bool) -> tuple[int, int] | None:
    x, y = obj.get("x"), obj.get("y")
    if x is None and y is None and not required:
        return None
    if x is None or y is None:
        raise RequestError("'x' and 'y' go together")
    return _coord(x, "'x'"), _coord(y, "'y'")


def _button(obj: dict[str, Any]) -> int:
    name = obj.get("button", "left")
    if not isinstance(name, str) or name not in BUTTONS:
        raise RequestError(f"unknown button {name!r} (left, middle or right)")
    return BUTTONS[name]


def char_keysym(ch: str) -> int:
    """The keysym that types `ch`."""
    if ch in CONTROL_KEYSYMS:
        return CONTROL_KEYSYMS[ch]
    o = ord(ch)
    if o < 0x20 or 0x7F <= o < 0xA0:
        raise RequestError(f"cannot type the control character {ch!r}")
    if 0xD800 <= o < 0xE000:
        raise RequestError("cannot type a lone surrogate")
    if o < 0x100:
        return o
    return 0x01000000 + o


def name_keysym(name: Any) -> int:
    """The keysym of an X keysym name ("Return", "a", "Control_L", "F5", ...)."""
    if not isinstance(name, str) or not name:
        raise RequestError("a key is a keysym name")
    ks = XK.string_to_keysym(name)
    if ks:
        return int(ks)
    if len(name) == 1:
        return char_keysym(name)
    # "U20AC" / "U+20AC" (XKB's spelling of a Unicode keysym) and "0xff0d".
    digits = None
    if name[:2] in ("U+", "u+"):
        digits = name[2:]
    elif name[0] in "Uu" and len(name) >= 5:
        digits = name[1:]
    if digits is not None:
        try:
            cp = int(digits, 16)
        except ValueError:
            cp = -1
        if 0 < cp <= 0x10FFFF:
            return char_keysym(chr(cp))
    if name[:2].lower() == "0x":
        try:
            ks = int(name, 16)
        except ValueError:
            ks = 0
        if 0 < ks <= 0x1FFFFFFF:
            return int(ks)
    raise RequestError(f"unknown key {name!r}")


def _parse_action(a: Any) -> tuple[Any, ...]:
    """One action checked and put in the form `Desktop.run` takes."""
    if not isinstance(a, dict):
        raise RequestError("an action is an object")
    kind = a.get("type")
    if kind == "move":
        return ("move", _point(a, True))
    if kind == "click":
        return ("click", _button(a), _num(a, "count", default=1, lo=1, hi=3), _point(a, False))
    if kind in ("press", "release"):
        return (kind, _button(a))
    if kind == "drag":
        path = a.get("path")
        if not isinstance(path, list) or len(path) < 2:
            raise RequestError("'path' is a list of at least 2 points")
        if len(path) > MAX_ACTIONS:
            raise RequestError("'path' is too long")
        points = []
        for p in path:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise RequestError("a point of 'path' is [x, y]")
            points.append((_coord(p[0], "a point of 'path'"), _coord(p[1], "a point of 'path'")))
        return ("drag", _button(a), points)
    if kind == "scroll":
        big = 1000
        dx = _num(a, "dx", default=0, lo=-big, hi=big)
        dy = _num(a, "dy", default=0, lo=-big, hi=big)
        return ("scroll", dx, dy, _point(a, False))
    if kind == "type":
        text = a.get("text")
        if not isinstance(text, str):
            raise RequestError("'text' is a string")
        if len(text) > MAX_TEXT:
            raise RequestError(f"'text' is longer than {MAX_TEXT} characters")
        return ("type", [char_keysym(c) for c in text])
    if kind == "key":
        keys = a.get("keys")
        if not isinstance(keys, list) or not keys or len(keys) > 16:
            raise RequestError("'keys' is a list of 1 to 16 key names")
        return ("key", [name_keysym(k) for k in keys], _num(a, "repeat", default=1, lo=1, hi=100))
    if kind in ("key_down", "key_up"):
        return (kind, name_keysym(a.get("key")))
    if kind == "wait":
        return ("wait", _num(a, "ms", lo=0, hi=60_000))
    if kind in ("cursor", "size"):
        return (kind,)
    raise RequestError(f"unknown action type {kind!r}")


class Shot:
    """A screenshot asked for."""

    def __init__(self, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise RequestError("'screenshot' is an object or null")
        fmt = spec.get("format", "png")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise RequestError(f"unknown image format {fmt!r} (png or jpeg)")
        self.format: str = FORMATS[fmt]
        self.quality = _num(spec, "quality", default=80, lo=1, hi=100)
        region = spec.get("region")
        self.region: tuple[int, int, int, int] | None = None
        if region is not None:
            if not isinstance(region, (list, tuple)) or len(region) != 4:
                raise RequestError("'region' is [x, y, width, height]")
            x, y, w, h = (_coord(v, "'region'") for v in region)
            if w < 1 or h < 1:
                raise RequestError("'region' has no area")
            self.region = (x, y, w, h)
        scale = spec.get("scale")
        if scale is not None:
            if (
                isinstance(scale, bool)
                or not isinstance(scale, (int, float))
                or not (math.isfinite(scale) and 0 < scale <= 1)
            ):
                raise RequestError("'scale' is a number in (0, 1]")
            scale = float(scale)
        self.scale: float | None = scale
        for key in ("cursor", "changed_only"):
            if not isinstance(spec.get(key, False), bool):
                raise RequestError(f"{key!r} is a boolean")
        self.cursor: bool = spec.get("cursor", False)
        self.changed_only: bool = spec.get("changed_only", False)


class Connection:
    """What one client connection keeps between its requests."""

    def __init__(self) -> None:
        # The screen as this connection last saw it (for `changed_only`): the X server's
        # pixels of the whole screen, rows `stride` bytes apart, and the screen's size.
        self.base: bytes | bytearray | None = None
        self.base_size = (0, 0)


# --- the X server --------------------------------------------------------------------------


class Desktop:
    """This process's connection to the X server. Hold `lock` around every use."""

    def __init__(self, name: str) -> None:
        self.lock = threading.Lock()
        self.d = xdisplay.Display(name)
        if not self.d.has_extension("XTEST"):
            raise RuntimeError("the X server has no XTEST extension")
        self.errors: list[str] = []
        self.d.set_error_handler(self._on_error)
        screen = self.d.screen()
        self.root = screen.root
        self.depth = int(screen.root_depth)
        info = self.d.display.info
        fmt = next((f for f in info.pixmap_formats if f.depth == self.depth), None)
        if fmt is None:
            raise RuntimeError(f"no pixmap format for depth {self.depth}")
        self.bpp = int(fmt.bits_per_pixel)
        self.pad = int(fmt.scanline_pad)
        lsb = info.image_byte_order == X.LSBFirst
        if self.depth in (24, 32) and self.bpp == 32:
            self.rawmode = "BGRX" if lsb else "XRGB"
        elif self.depth == 16 and self.bpp == 16 and lsb:
            self.rawmode = "BGR;16"
        else:
            raise RuntimeError(f"cannot capture depth {self.depth} ({self.bpp} bits a pixel)")
        for group in KEYSYM_GROUPS:
            with contextlib.suppress(ImportError):
                XK.load_keysym_group(group)
        self.min_kc = int(info.min_keycode)
        self.max_kc = int(info.max_keycode)
        self.width = int(screen.width_in_pixels)
        self.height = int(screen.height_in_pixels)
        # The keymap as last read (one tuple a keycode), keysym -> keycode at level 0, the
        # empty keycodes not bound by us, ours (keycode -> [keysym, last use]) least recently
        # used first, and the keycodes held down by key_down.
        self.per = 2
        self.keymap: list[tuple[int, ...]] = []
        self.level0: dict[int, int] = {}
        self.level1: dict[int, int] = {}
        self.shift: int | None = None
        self.free: list[int] = []
        self.bound: dict[int, list[Any]] = {}
        self.held: set[int] = set()
        self._read_keymap()

    def _on_error(self, err: Any, request: Any = None) -> None:
        self.errors.append(str(err))

    def _check(self) -> None:
        self.d.sync()
        if self.errors:
            text = "; ".join(self.errors)
            self.errors.clear()
            raise RequestError(f"X error: {text}")

    # keyboard mapping

    def _read_keymap(self) -> None:
        count = self.max_kc - self.min_kc + 1
        rows = self.d.get_keyboard_mapping(self.min_kc, count)
        self.keymap = [tuple(int(k) for k in row) for row in rows]
        self.per = max(2, len(self.keymap[0]) if self.keymap else 2)
        self.level0 = {}
        self.level1 = {}
        self.free = []
        bound: dict[int, list[Any]] = {}
        for i, row in enumerate(self.keymap):
            kc = self.min_kc + i
            ours = self.bound.get(kc)
            if ours is not None and row[:2] == (ours[0], ours[0]):
                bound[kc] = ours
            elif not any(row):
                self.free.append(kc)
            if row and row[0] and row[0] not in self.level0:
                self.level0[row[0]] = kc
            if len(row) > 1 and row[0] and row[1] and row[1] != row[0]:
                self.level1.setdefault(row[1], kc)
        self.shift = self.level0.get(SHIFT_L)
        # Keep the LRU order of the bindings that survived.
        self.bound = {kc: v for kc, v in self.bound.items() if kc in bound}
        # Take spare keycodes from the top: the low ones are the likelier to get keys.
        self.free.sort()

    def refresh(self) -> None:
        """Take the events queued; read the keymap again when another client changed it."""
        stale = False
        while self.d.pending_events():
            ev = self.d.next_event()
            if ev.type == X.MappingNotify and ev.request == X.MappingKeyboard:
                stale = True
        if stale:
            self._read_keymap()
        geo = self.root.get_geometry()
        self.width, self.height = int(geo.width), int(geo.height)

    def keycode(self, keysym: int) -> int:
        """A keycode that gives `keysym` with no modifier, binding a spare one if need be."""
        kc = self.level0.get(keysym)
        now = time.monotonic()
        if kc is not None:
            ours = self.bound.pop(kc, None)
            if ours is not None:
                ours[1] = now
                self.bound[kc] = ours  # most recently used last
            return kc
        if self.free:
            kc = self.free.pop()
        else:
            victim = next((k for k in self.bound if k not in self.held), None)
            if victim is None:
                raise RequestError("no spare keycode to bind the key to")
            old, used = self.bound.pop(victim)
            if self.level0.get(old) == victim:
                del self.level0[old]
            # The program the old key went to may not have read it yet.
            gap = used + REBIND_GAP - now
            if gap > 0:
                self.d.sync()
                time.sleep(gap)
            kc = victim
        row = (keysym, keysym) + (0,) * (self.per - 2)
        self.d.change_keyboard_mapping(kc, [row])
        self._check()
        self.keymap[kc - self.min_kc] = row
        self.level0[keysym] = kc
        self.bound[kc] = [keysym, time.monotonic()]
        return kc

    # input

    def _clamp(self, p: tuple[int, int]) -> tuple[int, int]:
        x = min(max(p[0], 0), self.width - 1)
        y = min(max(p[1], 0), self.height - 1)
        return x, y

    def move(self, p: tuple[int, int]) -> None:
        x, y = self._clamp(p)
        xtest.fake_input(self.d, X.MotionNotify, x=x, y=y)

    def button(self, button: int, down: bool) -> None:
        xtest.fake_input(self.d, X.ButtonPress if down else X.ButtonRelease, button)

    def key(self, keycode: int, down: bool) -> None:
        xtest.fake_input(self.d, X.KeyPress if down else X.KeyRelease, keycode)
        if down:
            self.held.add(keycode)
        else:
            self.held.discard(keycode)

    def type_keysym(self, keysym: int) -> None:
        shifted = self.level1.get(keysym)
        if keysym not in self.level0 and shifted is not None and self.shift is not None:
            held = self.shift in self.held  # by key_down: leave it so
            if not held:
                self.key(self.shift, True)
            self.key(shifted, True)
            self.key(shifted, False)
            if not held:
                self.key(self.shift, False)
            return
        kc = self.keycode(keysym)
        self.key(kc, True)
        self.key(kc, False)

    def pointer(self) -> list[int]:
        p = self.root.query_pointer()
        return [int(p.root_x), int(p.root_y)]

    def run(self, act: tuple[Any, ...], release_lock: threading.Lock | None = None) -> Any:
        """Do one action; its result (None for most)."""
        kind = act[0]
        if kind == "move":
            self.move(act[1])
        elif kind == "click":
            _, button, count, at = act
            if at is not None:
                self.move(at)
            for _ in range(count):
                self.button(button, True)
                self.button(button, False)
        elif kind in ("press", "release"):
            self.button(act[1], kind == "press")
        elif kind == "drag":
            _, button, points = act
            self.move(points[0])
            self.button(button, True)
            try:
                for p in points[1:]:
                    self.move(p)
            finally:
                self.button(button, False)
        elif kind == "scroll":
            _, dx, dy, at = act
            if at is not None:
                self.move(at)
            for button, n in ((5 if dy > 0 else 4, abs(dy)), (7 if dx > 0 else 6, abs(dx))):
                for _ in range(n):
                    self.button(button, True)
                    self.button(button, False)
        elif kind == "type":
            for keysym in act[1]:
                self.type_keysym(keysym)
        elif kind == "key":
            _, keysyms, repeat = act
            for _ in range(repeat):
                down: list[int] = []
                try:
                    for keysym in keysyms:
                        kc = self.keycode(keysym)
                        self.key(kc, True)
                        down.append(kc)
                finally:
                    for kc in reversed(down):
                        self.key(kc, False)
        elif kind == "key_down":
            self.key(self.keycode(act[1]), True)
        elif kind == "key_up":
            self.key(self.keycode(act[1]), False)
        elif kind == "wait":
            # Other connections may use the screen meanwhile.
            if release_lock is not None:
                release_lock.release()
            try:
                time.sleep(act[1] / 1000)
            finally:
                if release_lock is not None:
                    release_lock.acquire()
        elif kind == "cursor":
            self._check()
            return self.pointer()
        elif kind == "size":
            return [self.width, self.height]
        self._check()
        return None

    # capture

    def grab(self, x: int, y: int, w: int, h: int) -> tuple[bytes, int]:
        """The X server's pixels of a rectangle of the root window, and their row stride."""
        stride = self.stride(w)
        rows = max(1, STRIP_BYTES // stride)
        chunks = []
        for top in range(y, y + h, rows):
            n = min(rows, y + h - top)
            reply = self.root.get_image(x, top, w, n, X.ZPixmap, 0xFFFFFFFF)
            chunks.append(reply.data)
        data = b"".join(chunks)
        if len(data) < stride * h:
            raise RequestError("the X server sent a short image")
        return data, stride

    def stride(self, w: int) -> int:
        return (w * self.bpp + self.pad - 1) // self.pad * self.pad // 8

    def image(self, data: Any, w: int, h: int, stride: int) -> Any:
        """An RGB image of the pixels `grab` gave."""
        return Image.frombuffer("RGB", (w, h), data, "raw", self.rawmode, stride, 1)


def draw_pointer(img: Any, x: int, y: int) -> None:
    """Draw an arrow with its tip at (x, y) of `img`."""
    pts = [(x + dx, y + dy) for dx, dy in ARROW]
    ImageDraw.Draw(img).polygon(pts, fill=(255, 255, 255), outline=(0, 0, 0))


def changed_box(
    desk: Desktop, new: bytes, old: bytes | bytearray, stride: int, box: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """The bounding box of the pixels of `box` that differ between two full-screen grabs."""
    x0, y0, x1, y1 = box
    bpp = desk.bpp // 8
    rows = []
    for y in range(y0, y1):
        at = y * stride
        if new[at + x0 * bpp : at + x1 * bpp] != old[at + x0 * bpp : at + x1 * bpp]:
            rows.append(y)
            break
    if not rows:
        return None
    for y in range(y1 - 1, rows[0], -1):
        at = y * stride
        if new[at + x0 * bpp : at + x1 * bpp] != old[at + x0 * bpp : at + x1 * bpp]:
            break
    else:
        y = rows[0]
    top, bottom = rows[0], y + 1
    band = slice(top * stride, bottom * stride)
    sw = desk.width
    a = desk.image(bytes(new[band]), sw, bottom - top, stride).crop((x0, 0, x1, bottom - top))
    b = desk.image(bytes(old[band]), sw, bottom - top, stride).crop((x0, 0, x1, bottom - top))
    diff = ImageChops.difference(a, b).getbbox()
    if diff is None:  # differs in the bits X leaves unused
        return None
    return x0 + diff[0], top, x0 + diff[2], bottom


def capture(desk: Desktop, conn: Connection, shot: Shot) -> tuple[Any, dict[str, Any]]:
    """Take the screenshot `shot` asks for (with the X lock held): (image or None, header)."""
    sw, sh = desk.width, desk.height
    x, y, w, h = shot.region or (0, 0, sw, sh)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, sw), min(y + h, sh)
    if x1 <= x0 or y1 <= y0:
        raise RequestError("'region' lies outside the screen")
    box = (x0, y0, x1, y1)
    full_screen = box == (0, 0, sw, sh)
    if shot.changed_only:
        data, stride = desk.grab(0, 0, sw, sh)
        base = conn.base
        if base is not None and conn.base_size == (sw, sh):
            same = full_screen and data == base
            changed = None if same else changed_box(desk, data, base, stride, box)
            if full_screen:
                conn.base = data
            else:  # what this connection saw of the rest of the screen stays as it was
                base = base if isinstance(base, bytearray) else bytearray(base)
                bpp = desk.bpp // 8
                for row in range(y0, y1):
                    at = row * stride
                    base[at + x0 * bpp : at + x1 * bpp] = data[at + x0 * bpp : at + x1 * bpp]
                conn.base = base
            if changed is None:
                head = {"format": shot.format, "width": 0, "height": 0, "region": None}
                head["unchanged"] = True
                return None, head
            box = changed
        else:
            conn.base, conn.base_size = data, (sw, sh)
        img = desk.image(data, sw, sh, stride).crop(box)
    else:
        data, stride = desk.grab(x0, y0, x1 - x0, y1 - y0)
        if full_screen:
            conn.base, conn.base_size = data, (sw, sh)
        img = desk.image(data, x1 - x0, y1 - y0, stride)
    if shot.cursor:
        px, py = desk.pointer()
        draw_pointer(img, px - box[0], py - box[1])
    region = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    return img, {"format": shot.format, "region": region}


def encode(img: Any, shot: Shot, head: dict[str, Any]) -> bytes:
    """Scale and encode an image captured by `capture`; fills in its size in `head`."""
    if shot.scale is not None and shot.scale < 1:
        size = (max(1, round(img.width * shot.scale)), max(1, round(img.height * shot.scale)))
        # reducing_gap: a box reduction by an integer factor first, then bilinear: fast
        img = img.resize(size, BILINEAR, reducing_gap=1.0)
    head["width"], head["height"] = img.width, img.height
    buf = io.BytesIO()
    if shot.format == "png":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "JPEG", quality=shot.quality)
    return buf.getvalue()


def handle(desk: Desktop, conn: Connection, req: Any) -> tuple[dict[str, Any], bytes]:
    """Answer one request: (header, payload)."""
    if not isinstance(req, dict):
        raise RequestError("a request is a JSON object")
    actions = req.get("actions")
    if actions is None:
        actions = []
    if not isinstance(actions, list):
        raise RequestError("'actions' is a list")
    if len(actions) > MAX_ACTIONS:
        raise RequestError(f"more than {MAX_ACTIONS} actions")
    plan = []
    for i, a in enumerate(actions):
        try:
            plan.append(_parse_action(a))
        except RequestError as e:
            e.index = i
            raise
    spec = req.get("screenshot")
    shot = Shot(spec) if spec is not None else None
    results: list[Any] = []
    img = None
    shot_head: dict[str, Any] | None = None
    lock = desk.lock
    lock.acquire()
    try:
        try:
            desk.refresh()
            desk.errors.clear()
            for i, act in enumerate(plan):
                try:
                    results.append(desk.run(act, lock))
                except RequestError as e:
                    e.index = i
                    raise
                except xerror.XError as e:
                    raise RequestError(f"X error: {e}", i) from None
            if shot is not None:
                img, shot_head = capture(desk, conn, shot)
            cursor = desk.pointer()
        except xerror.ConnectionClosedError as e:
            raise FatalXError(str(e)) from None
        except xerror.XError as e:
            raise RequestError(f"X error: {e}") from None
    finally:
        lock.release()
    head: dict[str, Any] = {"ok": True, "results": results, "cursor": cursor}
    payload = b""
    if shot is not None and shot_head is not None:
        if img is not None:
            payload = encode(img, shot, shot_head)
        head["screenshot"] = shot_head
    return head, payload


# --- the server ----------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send(sock: socket.socket, head: dict[str, Any], payload: bytes = b"") -> None:
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    sock.sendall(HEADER.pack(len(raw), len(payload)) + raw)
    if payload:
        sock.sendall(payload)


def _error(text: str, index: int | None = None) -> dict[str, Any]:
    head: dict[str, Any] = {"ok": False, "error": text}
    if index is not None:
        head["index"] = index
    return head


class Server:
    def __init__(self, desk: Desktop, on_fatal: Any) -> None:
        self.desk = desk
        self.on_fatal = on_fatal
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def serve(self, listener: socket.socket) -> None:
        while True:
            sock, _ = listener.accept()
            if not self.slots.acquire(blocking=False):
                sock.close()
                continue
            t = threading.Thread(target=self._conn, args=(sock,), daemon=True)
            t.start()

    def _conn(self, sock: socket.socket) -> None:
        conn = Connection()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                raw = _recv_exact(sock, LENGTH.size)
                if raw is None:
                    return
                (n,) = LENGTH.unpack(raw)
                if n > MAX_REQUEST:
                    _send(sock, _error(f"request of {n} bytes; the most is {MAX_REQUEST}"))
                    return
                body = _recv_exact(sock, n)
                if body is None:
                    return
                try:
                    req = json.loads(body.decode("utf-8"))
                except (ValueError, RecursionError) as e:
                    _send(sock, _error(f"not a JSON request: {e}"))
                    continue
                try:
                    head, payload = handle(self.desk, conn, req)
                except RequestError as e:
                    head, payload = _error(str(e), e.index), b""
                except FatalXError as e:
                    self.on_fatal(f"lost the X server: {e}")
                    return
                except Exception as e:  # never let a request end the sidecar
                    sys.stderr.write(f"ctrl: request failed: {e!r}\n")
                    head, payload = _error(f"internal error: {e}"), b""
                _send(sock, head, payload)
        except OSError:
            pass
        finally:
            sock.close()
            self.slots.release()


class Children:
    """The programs this sidecar started, stopped in reverse order."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False
        self.lock = threading.Lock()

    def start(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out, **kw)
        self.procs.append((name, p))
        return p

    def keep(self, name: str, argv: list[str], process: subprocess.Popen[bytes]) -> None:
        """Start `name` again whenever it ends, until the sidecar stops: at once after a
        minute's run, else after a pause that doubles up to half a minute."""
        pause = KEEP_FIRST_PAUSE
        while True:
            started = time.monotonic()
            process.wait()
            if time.monotonic() - started > 60:
                pause = KEEP_FIRST_PAUSE
            time.sleep(pause)
            pause = min(pause * 2, KEEP_MAX_PAUSE)
            with self.lock:
                if self.stopping:
                    return
                self.procs = [(n, p) for n, p in self.procs if p is not process]
                try:
                    process = self.start(name, argv)
                except OSError as e:
                    sys.stderr.write(f"ctrl: cannot start {name} again: {e}\n")
                    return

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(reversed(self.procs))
        for _, p in procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.terminate()
        deadline = time.monotonic() + 5
        for _, p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_xvfb(children: Children, display: str, geometry: str) -> str:
    """Start Xvfb on `display`; the display name once it accepts connections."""
    exe = shutil.which("Xvfb") or "/usr/bin/Xvfb"
    if not os.path.exists(exe):
        raise RuntimeError("Xvfb is not installed")
    rfd, wfd = os.pipe()
    try:
        argv = [exe, display, "-screen", "0", geometry, "-nolisten", "tcp"]
        proc = children.start("Xvfb", [*argv, "-displayfd", str(wfd)], pass_fds=(wfd,))
    finally:
        os.close(wfd)
    try:
        deadline = time.monotonic() + XVFB_TIMEOUT
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"Xvfb did not start in {XVFB_TIMEOUT:.0f} s")
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 64)
                if not chunk:
                    rc = proc.wait()
                    raise RuntimeError(f"Xvfb exited with status {rc} before it was ready")
                buf += chunk
    finally:
        os.close(rfd)
    number = buf.split(b"\n", 1)[0].strip().decode()
    if not number.isdigit():
        raise RuntimeError(f"Xvfb gave no display number ({buf!r})")
    return f":{number}"


def wait_for_wm(d: Any, wm: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait (a while at most) for the window manager to announce itself on the root window."""
    root = d.screen().root
    check = d.intern_atom("_NET_SUPPORTING_WM_CHECK")
    root.change_attributes(event_mask=X.PropertyChangeMask)
    d.sync()
    deadline = time.monotonic() + timeout
    try:
        while wm.poll() is None:
            if root.get_full_property(check, X.AnyPropertyType) is not None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                sys.stderr.write("ctrl: the window manager did not announce itself\n")
                return
            if not d.pending_events():
                select.select([d.fileno()], [], [], min(left, 0.2))
            while d.pending_events():
                d.next_event()
    finally:
        root.change_attributes(event_mask=X.NoEventMask)
        d.sync()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ctrl", description="the ctrl sidecar of a desktop sandbox")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--depth", type=int, default=24, choices=(16, 24))
    ap.add_argument("--ctrl-port", type=int, required=True)
    ap.add_argument("--vnc-port", type=int, default=None)
    ap.add_argument("--display", default=":0")
    ap.add_argument("--log", default=None, help="a file for the children's output")
    args = ap.parse_args(argv)
    if not (1 <= args.width <= 8192 and 1 <= args.height <= 8192):
        ap.error("--width and --height are 1 to 8192")
    disp = args.display if args.display.startswith(":") else f":{args.display}"
    if not disp[1:].isdigit():
        ap.error("--display is :N")
    args.display = disp
    return args


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether something listens on 127.0.0.1:`port` within `timeout` seconds, while
    `process` (which is to listen there) runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out: Any = subprocess.DEVNULL
    if args.log:
        out = open(args.log, "ab")  # noqa: SIM115 - open for the sidecar's whole life
    children = Children(out)

    def fatal(message: str) -> None:
        with children.lock:
            if children.stopping:  # on the way out already: the X server went with it
                return
        sys.stderr.write(f"ctrl: {message}\n")
        sys.stderr.flush()
        children.stop()
        os._exit(1)

    try:
        try:
            geometry = f"{args.width}x{args.height}x{args.depth}"
            display = start_xvfb(children, args.display, geometry)
        except (RuntimeError, OSError) as e:
            sys.stderr.write(f"ctrl: {e}\n")
            return 1
        xvfb = children.procs[0][1]
        os.environ["DISPLAY"] = display

        def watch() -> None:
            fatal(f"Xvfb exited with status {xvfb.wait()}")

        threading.Thread(target=watch, daemon=True).start()

        try:
            desk = Desktop(display)
        except Exception as e:
            sys.stderr.write(f"ctrl: cannot use the X server {display}: {e}\n")
            return 1

        wm_argv = None
        if shutil.which("openbox"):
            wm_argv = ["openbox", "--sm-disable"]
        elif shutil.which("matchbox-window-manager"):
            wm_argv = ["matchbox-window-manager"]
        if wm_argv is not None:
            try:
                wm = children.start("wm", wm_argv)
                with desk.lock:
                    wait_for_wm(desk.d, wm, WM_TIMEOUT)
            except OSError as e:
                sys.stderr.write(f"ctrl: no window manager: {e}\n")
        if args.vnc_port is not None:
            vnc = shutil.which("x11vnc")
            if vnc is None:
                sys.stderr.write("ctrl: x11vnc is not installed; no VNC\n")
            else:
                vnc_argv = [vnc, "-display", display, "-rfbport", str(args.vnc_port)]
                vnc_argv += ["-localhost", "-shared", "-forever", "-nopw", "-quiet", "-noxdamage"]
                vnc_process = children.start("x11vnc", vnc_argv)
                # `ready` means a viewer can connect: wait until it listens.
                if not wait_for_port(args.vnc_port, vnc_process, VNC_TIMEOUT):
                    sys.stderr.write("ctrl: x11vnc did not listen; no VNC\n")
                # The sandbox's programs may end it (`pkill x11vnc`): it comes back.
                threading.Thread(
                    target=children.keep, args=("x11vnc", vnc_argv, vnc_process), daemon=True
                ).start()

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", args.ctrl_port))
            listener.listen(16)
        except OSError as e:
            sys.stderr.write(f"ctrl: cannot listen on 127.0.0.1:{args.ctrl_port}: {e}\n")
            return 1
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        Server(desk, fatal).serve(listener)
        return 0
    finally:
        # A second signal must not cut the children's end short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        children.stop()


if __name__ == "__main__":
    sys.exit(main())
