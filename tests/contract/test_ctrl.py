"""The ctrl sidecar of a desktop sandbox (`treadle/guest/ctrl.py`) against a real Xvfb: its
screenshots show exactly what is on the screen, the input it is asked for arrives exactly (in
order, with the asked coordinates, keys and text), `changed_only` answers the changed box, a
bad request is answered and the sidecar goes on, and SIGTERM ends it and its X server.

The sidecar runs as it does in a sandbox (Debian's python3 with python3-xlib and python3-pil);
the test talks its wire protocol over TCP and reads what X programs of its own (run by the same
interpreter) saw."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.desktop

CTRL = Path(__file__).resolve().parents[2] / "src" / "treadle" / "guest" / "ctrl.py"
PYTHON = "/usr/bin/python3"
XVFB = "/usr/bin/Xvfb"
X11_DIR = Path("/tmp/.X11-unix")
WIDTH, HEIGHT = 320, 200
TIMEOUT = 20.0


def _system_python_has(*modules: str) -> bool:
    if not os.path.exists(PYTHON):
        return False
    code = "".join(f"import {m}\n" for m in modules)
    return subprocess.run([PYTHON, "-I", "-c", code], capture_output=True).returncode == 0


if not os.path.exists(XVFB) or not _system_python_has("Xlib.ext.xtest", "PIL.Image"):
    pytest.skip("needs Xvfb, python3-xlib and python3-pil", allow_module_level=True)


# --- X programs of the test, run by the system interpreter ---------------------------------

# Windows filled with colors: `x,y,w,h,RRGGBB` an argument. Prints `ready` once they are on
# the screen; on stdin's end takes them away and prints `bye` once they are gone.
DRAWER = r"""
import sys
from Xlib import X, display
d = display.Display()
s = d.screen()
wins = []
for spec in sys.argv[1:]:
    x, y, w, h, color = spec.split(",")
    win = s.root.create_window(
        int(x), int(y), int(w), int(h), 0, s.root_depth, X.InputOutput, X.CopyFromParent,
        background_pixel=int(color, 16), override_redirect=True,
        event_mask=X.StructureNotifyMask)
    win.map()
    wins.append(win)
mapped = set()
while len(mapped) < len(wins):
    e = d.next_event()
    if e.type == X.MapNotify:
        mapped.add(e.window.id)
d.sync()
print("ready", flush=True)
sys.stdin.read()
for win in wins:
    win.destroy()
d.sync()
print("bye", flush=True)
"""

# A window over the whole screen that takes the keyboard and prints each input event as a
# JSON line: buttons with their root coordinates, keys with the keysym of their level 0 (`ks`)
# and of the level their modifiers select (`sym`), as the program's own keymap says.
RECORDER = r"""
import json, select, sys
from Xlib import X, display
d = display.Display()
s = d.screen()
mask = (X.KeyPressMask | X.KeyReleaseMask | X.ButtonPressMask | X.ButtonReleaseMask
        | X.PointerMotionMask | X.StructureNotifyMask)
win = s.root.create_window(
    0, 0, s.width_in_pixels, s.height_in_pixels, 0, s.root_depth, X.InputOutput,
    X.CopyFromParent, background_pixel=s.black_pixel, override_redirect=True, event_mask=mask)
win.map()
while True:
    e = d.next_event()
    if e.type == X.MapNotify and e.window == win:
        break
status = win.grab_keyboard(False, X.GrabModeAsync, X.GrabModeAsync, X.CurrentTime)
if status != X.GrabSuccess:
    sys.exit("cannot grab the keyboard: %s" % status)
d.sync()
print("ready", flush=True)
names = {X.ButtonPress: "bpress", X.ButtonRelease: "brelease", X.MotionNotify: "motion",
         X.KeyPress: "kpress", X.KeyRelease: "krelease"}
while True:
    if not d.pending_events():
        r, _, _ = select.select([d.fileno(), sys.stdin], [], [])
        if sys.stdin in r and not sys.stdin.readline():
            break
    while d.pending_events():
        e = d.next_event()
        if e.type == X.MappingNotify:
            d.refresh_keyboard_mapping(e)
            continue
        name = names.get(e.type)
        if name is None:
            continue
        out = {"t": name, "state": e.state}
        if name in ("kpress", "krelease"):
            ks = d.keycode_to_keysym(e.detail, 0)
            sym = d.keycode_to_keysym(e.detail, 1) if e.state & X.ShiftMask else ks
            out.update(ks=ks, sym=sym or ks)
        else:
            out.update(x=e.root_x, y=e.root_y)
            if name != "motion":
                out["b"] = e.detail
        print(json.dumps(out), flush=True)
win.destroy()
d.sync()
print("bye", flush=True)
"""


class Lines:
    """The lines a process writes on its stdout, each read with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line in {timeout} s (have {self.buf!r})")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"the process ended (rc={self.proc.wait()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process started with its own session, and whatever it left in its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


class XProgram:
    """A running DRAWER or RECORDER."""

    def __init__(self, display: str, script: str, args: list[str]) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DISPLAY": display}
        self.proc = subprocess.Popen(
            [PYTHON, "-I", "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.lines = Lines(self.proc)
        self.closed = False
        assert self.lines.next() == "ready"

    def events(self, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The events read up to the first one `until` accepts (it and the one before it left
        out: the press of the key whose release `until` waits for)."""
        got: list[dict[str, Any]] = []
        while True:
            ev = json.loads(self.lines.next())
            if until(ev):
                return got[:-1]
            got.append(ev)

    def close(self) -> None:
        """Take the program's windows away (and wait until they are gone), and end it."""
        if self.closed:
            return
        self.closed = True
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        while self.lines.next() != "bye":
            pass
        assert self.proc.wait(TIMEOUT) == 0


# --- the sidecar and its wire protocol -----------------------------------------------------


def _free_display() -> int:
    for n in range(90, 400):
        if not (X11_DIR / f"X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise AssertionError("no free X display number")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Ctrl:
    """A running ctrl sidecar."""

    def __init__(
        self, log: Path, width: int = WIDTH, height: int = HEIGHT, extra: tuple[str, ...] = ()
    ) -> None:
        self.number = _free_display()
        self.display = f":{self.number}"
        self.port = _free_port()
        self.log = log
        argv = [PYTHON, "-I", str(CTRL), "--display", self.display, "--ctrl-port", str(self.port)]
        argv += ["--width", str(width), "--height", str(height), "--depth", "24", *extra]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True
            )
        try:
            line = Lines(self.proc).next(30)
        except AssertionError as e:
            _stop(self.proc)
            raise AssertionError(f"ctrl did not start: {e}: {log.read_text()}") from None
        assert line == "ready"

    def connect(self) -> Client:
        return Client(self.port)

    def stop(self) -> None:
        _stop(self.proc)


class Client:
    """One connection to the sidecar's ctrl port."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send_raw(self, body: bytes, length: int | None = None) -> None:
        self.sock.sendall(struct.pack(">I", len(body) if length is None else length) + body)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def reply(self) -> tuple[dict[str, Any], bytes]:
        head_len, payload_len = struct.unpack(">II", self._exact(8))
        head = json.loads(self._exact(head_len))
        assert isinstance(head, dict)
        return head, self._exact(payload_len)

    def request(self, **req: Any) -> tuple[dict[str, Any], bytes]:
        self.send_raw(json.dumps(req).encode())
        return self.reply()

    def ok(self, **req: Any) -> tuple[dict[str, Any], bytes]:
        head, payload = self.request(**req)
        assert head["ok"] is True, head
        return head, payload

    def do(self, *actions: dict[str, Any]) -> list[Any]:
        results: list[Any] = self.ok(actions=list(actions))[0]["results"]
        return results

    def shot(self, **spec: Any) -> tuple[dict[str, Any], bytes]:
        head, payload = self.ok(screenshot={"format": "png", **spec})
        return head["screenshot"], payload


@pytest.fixture(scope="module")
def ctrl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctrl]:
    sidecar = Ctrl(tmp_path_factory.mktemp("ctrl") / "stderr")
    try:
        yield sidecar
    finally:
        sidecar.stop()


@pytest.fixture
def client(ctrl: Ctrl) -> Iterator[Client]:
    with ctrl.connect() as c:
        yield c


@pytest.fixture
def xprogram(ctrl: Ctrl) -> Iterator[Callable[..., XProgram]]:
    started: list[XProgram] = []

    def start(script: str, *args: str) -> XProgram:
        started.append(XProgram(ctrl.display, script, list(args)))
        return started[-1]

    try:
        yield start
    finally:
        # Gone from the screen (and the keyboard released) before the next test starts.
        for program in started:
            try:
                program.close()
            finally:
                _stop(program.proc)


# --- images --------------------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an 8-bit RGB PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    width = height = 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, bits, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (bits, color, interlace) == (8, 2, 0)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = width * 3
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(3, stride):
                line[i] = (line[i] + line[i - 3]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - 3] if i >= 3 else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - 3] if i >= 3 else 0
                b, c = prev[i], prev[i - 3] if i >= 3 else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        else:
            assert kind == 0, kind
        out += line
        prev = line
    return width, height, bytes(out)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header."""
    assert data[:2] == b"\xff\xd8"
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        (n,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + n
    raise AssertionError("no frame header")


class Pixels:
    def __init__(self, png: bytes) -> None:
        self.width, self.height, self.rgb = decode_png(png)

    def at(self, x: int, y: int) -> tuple[int, int, int]:
        i = (y * self.width + x) * 3
        r, g, b = self.rgb[i : i + 3]
        return r, g, b

    def colors(self, x: int, y: int, w: int, h: int) -> set[tuple[int, int, int]]:
        return {self.at(i, j) for j in range(y, y + h) for i in range(x, x + w)}


def rgb(color: str) -> tuple[int, int, int]:
    value = int(color, 16)
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


# --- screenshots ---------------------------------------------------------------------------


def test_a_request_without_actions_or_screenshot_is_a_ping(client: Client) -> None:
    head, payload = client.ok()
    assert head["results"] == [] and payload == b"" and "screenshot" not in head
    assert len(head["cursor"]) == 2
    assert client.do({"type": "size"}, {"type": "move", "x": 7, "y": 9}, {"type": "cursor"}) == [
        [WIDTH, HEIGHT],
        None,
        [7, 9],
    ]
    assert client.ok()[0]["cursor"] == [7, 9]


def test_png_screenshots_have_the_asked_size(client: Client) -> None:
    shot, png = client.shot()
    assert shot == {"format": "png", "width": WIDTH, "height": HEIGHT, "region": [0, 0, 320, 200]}
    assert Pixels(png).width == WIDTH and Pixels(png).height == HEIGHT

    shot, png = client.shot(region=[10, 20, 100, 50])
    assert (shot["width"], shot["height"], shot["region"]) == (100, 50, [10, 20, 100, 50])
    assert decode_png(png)[:2] == (100, 50)

    shot, png = client.shot(scale=0.5)
    assert (shot["width"], shot["height"], shot["region"]) == (160, 100, [0, 0, 320, 200])
    assert decode_png(png)[:2] == (160, 100)

    shot, png = client.shot(region=[300, 190, 50, 50], scale=0.5)  # clipped to the screen
    assert (shot["width"], shot["height"], shot["region"]) == (10, 5, [300, 190, 20, 10])
    assert decode_png(png)[:2] == (10, 5)


def test_jpeg_screenshots_follow_the_quality(client: Client) -> None:
    sizes = {}
    for quality in (10, 95):
        shot, jpeg = client.shot(format="jpeg", quality=quality)
        assert shot == {
            "format": "jpeg",
            "width": WIDTH,
            "height": HEIGHT,
            "region": [0, 0, 320, 200],
        }
        assert jpeg_size(jpeg) == (WIDTH, HEIGHT) and jpeg.endswith(b"\xff\xd9")
        sizes[quality] = len(jpeg)
    assert sizes[10] < sizes[95]
    shot, jpeg = client.shot(format="jpeg", region=[0, 0, 64, 48], scale=0.5)
    assert jpeg_size(jpeg) == (32, 24) == (shot["width"], shot["height"])


RECTS = ["20,30,40,25,ff0000", "100,50,30,30,00ff00", "200,100,50,40,0000ff", "5,150,9,7,0c2238"]


def test_a_screenshot_shows_exactly_the_pixels_on_the_screen(
    client: Client, xprogram: Callable[..., XProgram]
) -> None:
    drawer = xprogram(DRAWER, *RECTS)
    pixels = Pixels(client.shot()[1])
    for spec in RECTS:
        x, y, w, h = (int(v) for v in spec.split(",")[:4])
        color = rgb(spec.split(",")[4])
        assert pixels.colors(x, y, w, h) == {color}, spec
        # and not one pixel more: the rows and columns around it are the background
        around = (
            pixels.colors(x - 1, y, 1, h)
            | pixels.colors(x + w, y, 1, h)
            | pixels.colors(x, y - 1, w, 1)
            | pixels.colors(x, y + h, w, 1)
        )
        assert color not in around, spec
        region = Pixels(client.shot(region=[x, y, w, h])[1])
        assert region.colors(0, 0, w, h) == {color}
    drawer.close()
    assert rgb("ff0000") not in Pixels(client.shot(region=[20, 30, 40, 25])[1]).colors(0, 0, 40, 25)


def test_the_pointer_is_drawn_only_when_asked(
    client: Client, xprogram: Callable[..., XProgram]
) -> None:
    xprogram(DRAWER, "80,80,60,60,336699")
    client.do({"type": "move", "x": 100, "y": 100})
    plain = Pixels(client.shot(region=[80, 80, 60, 60])[1])
    assert plain.colors(0, 0, 60, 60) == {rgb("336699")}
    with_pointer = Pixels(client.shot(region=[80, 80, 60, 60], cursor=True)[1])
    assert with_pointer.at(20, 20) != rgb("336699")  # the tip, at (100, 100)
    assert with_pointer.at(0, 0) == rgb("336699")  # far from it
    assert len(with_pointer.colors(0, 0, 60, 60)) > 1
    # and drawing it did not change what a later plain capture shows
    assert Pixels(client.shot()[1]).colors(80, 80, 60, 60) == {rgb("336699")}


def test_changed_only_answers_the_changed_box(
    ctrl: Ctrl, xprogram: Callable[..., XProgram]
) -> None:
    with ctrl.connect() as c:
        # the first capture of a connection has nothing to compare with: the whole screen
        shot, png = c.shot(changed_only=True)
        assert shot["region"] == [0, 0, WIDTH, HEIGHT] and decode_png(png)[:2] == (WIDTH, HEIGHT)
        unchanged = {"format": "png", "width": 0, "height": 0, "region": None, "unchanged": True}
        assert c.shot(changed_only=True) == (unchanged, b"")

        drawer = xprogram(DRAWER, "50,60,30,20,ff00ff")
        shot, png = c.shot(changed_only=True)
        assert shot == {"format": "png", "width": 30, "height": 20, "region": [50, 60, 30, 20]}
        assert Pixels(png).colors(0, 0, 30, 20) == {rgb("ff00ff")}
        assert c.shot(changed_only=True) == (unchanged, b"")

        # each connection compares with what it saw itself
        with ctrl.connect() as other:
            assert other.shot(changed_only=True)[0]["region"] == [0, 0, WIDTH, HEIGHT]

        drawer.close()
        shot, _ = c.shot(changed_only=True, format="jpeg", scale=0.5)
        assert shot == {"format": "jpeg", "width": 15, "height": 10, "region": [50, 60, 30, 20]}

        # a plain full-screen capture is the new reference too
        drawer = xprogram(DRAWER, "10,10,4,4,00ffff")
        c.shot()
        assert c.shot(changed_only=True) == (unchanged, b"")
        drawer.close()
        # restricted to a region: only what changed inside it
        assert c.shot(changed_only=True, region=[100, 100, 50, 50]) == (unchanged, b"")
        shot, _ = c.shot(changed_only=True, region=[0, 0, 12, 12])
        assert shot["region"] == [10, 10, 2, 2]
        shot, _ = c.shot(changed_only=True)
        assert shot["region"] == [10, 10, 4, 4]


# --- input ---------------------------------------------------------------------------------

SENTINEL = 0xFFC9  # F12


def _is_sentinel(ev: dict[str, Any]) -> bool:
    """The end of what an input test sent: F12 let go (its press is left out too)."""
    return bool(ev["t"] == "krelease" and ev["ks"] == SENTINEL)


def _char(keysym: int) -> str:
    special = {0xFF0D: "\n", 0xFF09: "\t", 0xFF08: "\b"}
    if keysym in special:
        return special[keysym]
    if keysym < 0x100:
        return chr(keysym)
    assert keysym >= 0x01000000, hex(keysym)
    return chr(keysym - 0x01000000)


def _typed(events: list[dict[str, Any]]) -> str:
    """The text the key presses of `events` type (modifiers are no text)."""
    modifiers = range(0xFFE1, 0xFFEF)  # Shift_L ... Hyper_R
    return "".join(
        _char(ev["sym"]) for ev in events if ev["t"] == "kpress" and ev["ks"] not in modifiers
    )


def test_pointer_input_arrives_exactly(client: Client, xprogram: Callable[..., XProgram]) -> None:
    recorder = xprogram(RECORDER)
    client.do(
        {"type": "click", "button": "left", "x": 10, "y": 20},
        {"type": "click", "button": "right", "count": 2, "x": 30, "y": 40},
        {"type": "scroll", "dx": -1, "dy": 2, "x": 50, "y": 60},
        {"type": "scroll", "dx": 1, "dy": -1},
        {"type": "drag", "button": "left", "path": [[100, 100], [150, 120], [200, 150]]},
        {"type": "press", "button": "middle"},
        {"type": "release", "button": "middle"},
        {"type": "move", "x": 5000, "y": -3},  # clamped to the screen
        {"type": "key", "keys": ["F12"]},
    )
    got = [
        (ev["t"], ev.get("b"), ev["x"], ev["y"])
        for ev in recorder.events(_is_sentinel)
        if ev["t"] != "motion" or ev["x"] in (150, 200, WIDTH - 1)
    ]

    def click(b: int, x: int, y: int) -> list[tuple[str, int | None, int, int]]:
        return [("bpress", b, x, y), ("brelease", b, x, y)]

    assert got == [
        *click(1, 10, 20),
        *click(3, 30, 40),
        *click(3, 30, 40),
        *click(5, 50, 60),
        *click(5, 50, 60),
        *click(6, 50, 60),
        *click(4, 50, 60),
        *click(7, 50, 60),
        ("bpress", 1, 100, 100),
        ("motion", None, 150, 120),
        ("motion", None, 200, 150),
        ("brelease", 1, 200, 150),
        *click(2, 200, 150),
        ("motion", None, WIDTH - 1, 0),
    ]


def test_keyboard_input_arrives_exactly(client: Client, xprogram: Callable[..., XProgram]) -> None:
    recorder = xprogram(RECORDER)
    text = "héllo Wörld ✓ Ω\n\tx!#€ 漢字 🙂"
    client.do({"type": "type", "text": text}, {"type": "key", "keys": ["F12"]})
    events = recorder.events(_is_sentinel)
    assert _typed(events) == text
    # each character a key pressed and let go; capitals and shifted punctuation with Shift
    # (the others with no modifier at all: with a spare key bound to the character)
    shift_l = 0xFFE1
    keys = [ev for ev in events if ev["ks"] != shift_l]
    assert [ev["t"] for ev in keys] == ["kpress", "krelease"] * len(text)
    with_shift = "".join(_char(ev["sym"]) for ev in keys if ev["t"] == "kpress" and ev["state"])
    assert with_shift == "W!#"
    assert {ev["state"] for ev in keys} == {0, 1}  # 1: ShiftMask

    control_l, t, alt_l, backspace = 0xFFE3, 0x74, 0xFFE9, 0xFF08
    client.do(
        {"type": "key", "keys": ["Control_L", "Shift_L", "t"]},
        {"type": "key", "keys": ["BackSpace"], "repeat": 3},
        {"type": "key_down", "key": "Alt_L"},
        {"type": "key_up", "key": "Alt_L"},
        {"type": "key", "keys": ["ω"]},  # a character as a key name: bound to a spare key
        {"type": "key", "keys": ["F12"]},
    )
    got = [(ev["t"], ev["ks"]) for ev in recorder.events(_is_sentinel)]
    assert got == [
        ("kpress", control_l),
        ("kpress", shift_l),
        ("kpress", t),
        ("krelease", t),
        ("krelease", shift_l),
        ("krelease", control_l),
        *[("kpress", backspace), ("krelease", backspace)] * 3,
        ("kpress", alt_l),
        ("krelease", alt_l),
        ("kpress", 0x010003C9),
        ("krelease", 0x010003C9),
    ]


def test_typing_more_characters_than_spare_keys(
    client: Client, xprogram: Callable[..., XProgram]
) -> None:
    recorder = xprogram(RECORDER)
    greek = "".join(chr(c) for c in range(0x3B1, 0x3CA)) + "".join(
        chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2
    )
    text = f"{greek} {greek[::-1]}"
    client.do({"type": "type", "text": text}, {"type": "key", "keys": ["F12"]})
    assert _typed(recorder.events(_is_sentinel)) == text


# --- bad requests and the end --------------------------------------------------------------


def test_a_bad_request_is_answered_and_the_sidecar_goes_on(ctrl: Ctrl) -> None:
    with ctrl.connect() as c:
        c.do({"type": "move", "x": 1, "y": 2})
        c.send_raw(b"{not json")
        head, payload = c.reply()
        assert head["ok"] is False and "JSON" in head["error"] and payload == b""

        bad: list[tuple[dict[str, Any], int | None]] = [
            ({"actions": [{"type": "move", "x": 50, "y": 50}, {"type": "fly"}]}, 1),
            ({"actions": [{"type": "key", "keys": ["Control_L", "NoSuchKey"]}]}, 0),
            ({"actions": [{"type": "click", "button": "fourth"}]}, 0),
            ({"actions": [{"type": "drag", "path": [[1, 2]]}]}, 0),
            ({"actions": [{"type": "type", "text": 5}]}, 0),
            ({"actions": {"type": "move"}}, None),
            ({"actions": [{"type": "click", "button": ["left"]}]}, 0),
            ({"actions": [{"type": "move", "x": "1", "y": 2}]}, 0),
            ({"screenshot": {"format": "gif"}}, None),
            ({"screenshot": {"format": ["png"]}}, None),
            ({"screenshot": {"format": "png", "scale": 2}}, None),
            ({"screenshot": {"format": "png", "region": [400, 400, 10, 10]}}, None),
        ]
        for req, index in bad:
            head, payload = c.request(**req)
            assert head["ok"] is False and head["error"], req
            assert head.get("index") == index, (req, head)
            assert payload == b""
        for body in (b"[1, 2]", b"[" * 200_000, b"\xff\xfe"):  # not an object, too deep, not UTF-8
            c.send_raw(body)
            assert c.reply()[0]["ok"] is False, body[:10]
        # nothing of a request that failed was done
        assert c.ok()[0]["cursor"] == [1, 2]

        c.send_raw(b"", length=(1 << 20) + 1)
        head, _ = c.reply()
        assert head["ok"] is False
        assert c.sock.recv(1) == b""  # and the connection is closed

    with ctrl.connect() as c:
        assert c.do({"type": "cursor"}) == [[1, 2]]


def test_a_wait_leaves_the_screen_to_other_connections(ctrl: Ctrl) -> None:
    with ctrl.connect() as waiting, ctrl.connect() as other:
        waiting.send_raw(json.dumps({"actions": [{"type": "wait", "ms": 300}]}).encode())
        for _ in range(3):
            other.ok(actions=[{"type": "cursor"}], screenshot={"format": "jpeg"})
        assert select.select([waiting.sock], [], [], 0)[0] == []  # still waiting
        head, _ = waiting.reply()
        assert head["ok"] is True and head["results"] == [None]


@pytest.mark.skipif(not os.path.exists("/usr/bin/x11vnc"), reason="needs x11vnc")
def test_vnc_serves_the_same_screen(tmp_path: Path) -> None:
    vnc_port = _free_port()
    sidecar = Ctrl(tmp_path / "stderr", extra=("--vnc-port", str(vnc_port)))
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # x11vnc listens a moment after the sidecar is ready
            try:
                with socket.create_connection(("127.0.0.1", vnc_port), timeout=TIMEOUT) as s:
                    assert s.recv(12).startswith(b"RFB 003.")
                    break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "x11vnc does not listen"
                time.sleep(0.05)
    finally:
        sidecar.stop()


def _gone(path: Path, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_sigterm_ends_the_sidecar_and_its_x_server(tmp_path: Path) -> None:
    sidecar = Ctrl(tmp_path / "stderr")
    try:
        socket_path = X11_DIR / f"X{sidecar.number}"
        assert socket_path.exists()
        with sidecar.connect() as c:
            c.ok()
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.proc.wait(TIMEOUT) == 0
        assert _gone(socket_path)
        with pytest.raises(ProcessLookupError):
            os.killpg(sidecar.proc.pid, 0)  # no process of its group is left
    finally:
        sidecar.stop()


def test_the_sidecar_ends_when_its_x_server_dies(tmp_path: Path) -> None:
    sidecar = Ctrl(tmp_path / "stderr")
    try:
        children = Path(f"/proc/{sidecar.proc.pid}/task/{sidecar.proc.pid}/children")
        xvfb = [
            int(pid)
            for pid in children.read_text().split()
            if Path(f"/proc/{pid}/comm").read_text().strip() == "Xvfb"
        ]
        assert len(xvfb) == 1
        os.kill(xvfb[0], signal.SIGTERM)  # (SIGKILL would leave its socket behind)
        assert sidecar.proc.wait(TIMEOUT) == 1
        assert "Xvfb exited" in sidecar.log.read_text()
        assert _gone(X11_DIR / f"X{sidecar.number}")
    finally:
        sidecar.stop()
