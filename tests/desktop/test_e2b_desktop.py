"""E2B Desktop (`e2b-desktop` from PyPI, installed next to `e2b` 2.63 by scripts/e2b-sdks) on
treadle's `desktop` template, through the E2B-compatible surface only: every action of its
`Sandbox` is one command run through envd's `commands` (xdotool, scrot, xrandr), a screenshot
is read and removed through `files`, and its stream URL is `https://6080-{id}.{domain}/vnc.html`,
which Weaver's host-name routing serves (docs/e2b.md, *E2B Desktop*).

Its `Sandbox.create()` starts an X server and an XFCE session itself and waits 60 s for
XFCE's processes; treadle's node starts the display (Xvfb, openbox, x11vnc) and has no XFCE,
so the stock `create()` fails, and these tests create through a subclass that skips
`_start_xfce4`. (The Xvfb that create() starts on `:0` finds the node's there and exits:
harmless.)
One sandbox serves the module; each test drives it with a program of its own that connects
with the stock class."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from desktop.programs import DRAWER, RECORDER, SANDBOX_PYTHON
from e2b.programs import SDK
from support.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.desktop]

DOMAIN = "desk.test"
VERSION = "2.63"  # the SDK env scripts/e2b-sdks installs e2b-desktop into
ROOT = Path(__file__).resolve().parents[2]
NEEDED = {
    "Xvfb": shutil.which("Xvfb"),
    "x11vnc": shutil.which("x11vnc"),
    "xdotool": shutil.which("xdotool"),
    "scrot": shutil.which("scrot"),
    "xdpyinfo": shutil.which("xdpyinfo"),  # create() polls it
    "python3-xlib": Path("/usr/lib/python3/dist-packages/Xlib").is_dir() or None,
}

# e2b_desktop's Sandbox without the XFCE session its create() starts (and waits 60 s for):
# on treadle the node has started the desktop already.
TREADLE_DESKTOP = """
from e2b_desktop import Sandbox as Desktop

class TreadleDesktop(Desktop):
    def _start_xfce4(self):
        pass
"""

# A window managed by openbox, with a known class and title (argv: the title), nearly as big as
# the screen, so that a click at its middle lands in it wherever openbox places it.
PROBE = r"""
import sys
from Xlib import X, Xutil, display
d = display.Display()
s = d.screen()
w = s.root.create_window(0, 0, 1200, 700, 0, s.root_depth, X.InputOutput, X.CopyFromParent,
                         background_pixel=s.white_pixel)
w.set_wm_hints(flags=Xutil.InputHint, input=1)
w.set_wm_name(sys.argv[1])
w.set_wm_class("probe", "TreadleProbe")
w.map()
d.sync()
print(w.id, flush=True)
while True:
    d.next_event()
"""


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SDK]:
    """The SDK, pointed at a Weaver with host-name routing (for the stream URL) and a Shuttle
    of the namespace tier (which runs desktops)."""
    missing = [name for name, found in NEEDED.items() if not found]
    python = ROOT / ".e2b" / VERSION / "bin" / "python"
    if not list(ROOT.glob(f".e2b/{VERSION}/lib/python3*/site-packages/e2b_desktop/main.py")):
        missing.append(f"e2b-desktop in .e2b/{VERSION} (scripts/e2b-sdks installs it)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"not installed: {', '.join(missing)}; scripts/test installs them")
        pytest.skip(f"not installed: {', '.join(missing)}")
    assert python.exists()
    cluster = Cluster(tmp_path_factory.mktemp("e2b-desktop"))
    try:
        cluster.start_weaver(process_tier=False, sandbox_domain=DOMAIN)
        cluster.start_shuttle("desk0", "--runtime", "namespace", "--cpu", "64000")
        yield SDK(cluster, VERSION, "sync")
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def created(sdk: SDK) -> Iterator[dict[str, Any]]:
    """The module's sandbox, made by e2b_desktop's create() (less XFCE), template and all
    defaulted: what it said then."""
    seen = sdk.run(
        TREADLE_DESKTOP
        + """
sbx = TreadleDesktop.create(allow_internet_access=False, timeout=600, metadata={"t": "desk"})
info = sbx.get_info()
env = sbx.commands.run("echo $DISPLAY; id -un; pwd").stdout.split()
out(id=sbx.sandbox_id, template=info.template_id, env=env, url=sbx.stream.get_url(),
    view_only=sbx.stream.get_url(view_only=True, auto_connect=False),
    start=await failure(sbx.stream.start))
"""
    )
    try:
        yield seen
    finally:
        with httpx.Client(base_url=sdk.cluster.url, timeout=30) as api:
            api.delete(f"/sandboxes/{seen['id']}", headers={"X-API-Key": sdk.cluster.admin_key})


def drive(sdk: SDK, created: dict[str, Any], body: str) -> dict[str, Any]:
    """Run `body` with `sbx` the module's sandbox, connected to by e2b_desktop's Sandbox."""
    return sdk.run(
        f"from e2b_desktop import Sandbox as Desktop\nsbx = Desktop.connect({created['id']!r})\n"
        + body
    )


def test_create_uses_the_desktop_template(created: dict[str, Any]) -> None:
    assert created["template"] == "desktop"
    assert created["env"] == [":0", "user", "/home/user"]


def test_stock_create_waits_for_xfce_and_fails_clearly(sdk: SDK) -> None:
    """The stock create() starts `startxfce4`, which is not there, then polls 60 s for
    xfce4-session, xfwm4 and xfdesktop; it fails with TimeoutException and kills the
    sandbox. (Its polls run here without their pauses: the same calls, the same end.)"""
    seen = sdk.run(
        """
import e2b_desktop.main as edm
from e2b_desktop import Sandbox as Desktop

class _NoPause:
    @staticmethod
    def sleep(seconds):
        pass

edm.time = _NoPause
made = await failure(lambda: Desktop.create(allow_internet_access=False, metadata={"t": "stock"}))
left = S.list(query=SandboxQuery(metadata={"t": "stock"})).next_items()
out(made=made, left=[s.sandbox_id for s in left])
"""
    )
    assert seen["made"]["type"] == "TimeoutException", seen
    assert seen["made"]["message"] == "Could not start XFCE"
    assert seen["left"] == []


def test_no_xfce_on_the_node(sdk: SDK, created: dict[str, Any]) -> None:
    seen = drive(
        sdk,
        created,
        """
ran = sbx.commands.run("command -v startxfce4 xfce4-session xfwm4 xfdesktop; "
                       "pgrep -x Xvfb; pgrep -x openbox; pgrep -x x11vnc; true")
out(stdout=ran.stdout)
""",
    )
    # None of XFCE; one Xvfb (the node's: the SDK's own on :0 exited), openbox and x11vnc.
    assert len(seen["stdout"].split()) == 3, seen


def test_a_screenshot_is_a_png_of_what_is_on_screen(sdk: SDK, created: dict[str, Any]) -> None:
    seen = drive(
        sdk,
        created,
        f"""
import base64
sbx.files.write("drawer.py", {DRAWER!r})
drawer = sbx.commands.run({SANDBOX_PYTHON!r} + " drawer.py 100 80 120 60 ff8000 > drawn.txt",
                          background=True, timeout=0)
try:
    sbx.commands.run("until grep -q drawn drawn.txt; do sleep 0.02; done", timeout=30)
    png = bytes(sbx.screenshot())
    streamed = b"".join(sbx.screenshot(format="stream"))
finally:
    drawer.kill()
left = sbx.commands.run("ls /tmp").stdout.split()
out(png=base64.b64encode(png).decode(), streamed=base64.b64encode(streamed).decode(), left=left)
""",
    )
    for key in ("png", "streamed"):
        image = Image.open(io.BytesIO(base64.b64decode(seen[key])))
        assert (image.format, image.size) == ("PNG", (1280, 800))
        rgb = image.convert("RGB")
        inside = {rgb.getpixel((x, y)) for x in range(105, 215, 9) for y in range(85, 135, 9)}
        assert inside == {(255, 128, 0)}
        assert rgb.getpixel((99, 79)) != (255, 128, 0)
    # scrot wrote each to /tmp/screenshot-<uuid>.png; the SDK removed it through `files`.
    assert not [name for name in seen["left"] if name.startswith("screenshot-")]


def test_the_pointer_goes_where_it_is_sent(sdk: SDK, created: dict[str, Any]) -> None:
    seen = drive(
        sdk,
        created,
        """
sbx.move_mouse(100, 200)
moved = sbx.get_cursor_position()
sbx.left_click(640, 400)
clicked = sbx.get_cursor_position()
sbx.move_mouse(1279, 799)
corner = sbx.get_cursor_position()
out(moved=moved, clicked=clicked, corner=corner)
""",
    )
    assert (seen["moved"], seen["clicked"], seen["corner"]) == ([100, 200], [640, 400], [1279, 799])


def test_input_reaches_a_window_in_order(sdk: SDK, created: dict[str, Any]) -> None:
    """Clicks, the wheel, a drag, typing and keys, as a full-screen window that has the focus
    receives them."""
    seen = drive(
        sdk,
        created,
        f"""
import json
sbx.files.write("recorder.py", {RECORDER!r})
recorder = sbx.commands.run({SANDBOX_PYTHON!r} + " recorder.py > events.jsonl",
                            background=True, timeout=0)
try:
    sbx.commands.run("until grep -q ready events.jsonl; do sleep 0.02; done", timeout=30)
    sbx.left_click(100, 150)
    sbx.double_click(200, 250)
    sbx.right_click(300, 350)
    sbx.middle_click(400, 450)
    sbx.scroll("down", 2)
    sbx.scroll("up")
    sbx.drag((10, 20), (60, 70))
    sbx.write("Hi there, e2b!")
    sbx.press("enter")
    sbx.press(["ctrl", "a"])
    sbx.wait(50)
    sbx.press("f12")
    sbx.commands.run("until grep -q 'key_release.*F12' events.jsonl; do sleep 0.02; done",
                     timeout=30)
finally:
    recorder.kill()
events = [json.loads(line) for line in sbx.files.read("events.jsonl").splitlines()]
out(events=events[1:])
""",
    )
    events = seen["events"]
    buttons = [
        (e["event"], e["button"], e["x"], e["y"])
        for e in events
        if e["event"] in ("press", "release")
    ]
    assert buttons == [
        ("press", 1, 100, 150),
        ("release", 1, 100, 150),
        *[("press", 1, 200, 250), ("release", 1, 200, 250)] * 2,
        ("press", 3, 300, 350),
        ("release", 3, 300, 350),
        ("press", 2, 400, 450),
        ("release", 2, 400, 450),
        *[("press", 5, 400, 450), ("release", 5, 400, 450)] * 2,
        ("press", 4, 400, 450),
        ("release", 4, 400, 450),
        ("press", 1, 10, 20),
        ("release", 1, 60, 70),
    ]
    keys = [e for e in events if e["event"] == "key_press"]
    plain = "".join(e["text"] for e in keys if not e["state"] & 4)  # 4: Control held
    assert plain == "Hi there, e2b!\n"
    assert [(e["key"], bool(e["state"] & 4)) for e in keys[-3:]] == [
        ("Control_L", False),
        ("a", True),
        ("F12", False),
    ]


def test_windows_by_class_and_title(sdk: SDK, created: dict[str, Any]) -> None:
    seen = drive(
        sdk,
        created,
        f"""
none = await failure(lambda: sbx.get_application_windows("TreadleProbe"))
sbx.files.write("probe.py", {PROBE!r})
probe = sbx.commands.run({SANDBOX_PYTHON!r} + " probe.py 'probe title'",
                         background=True, timeout=0)
try:
    sbx.commands.run("until xdotool search --onlyvisible --class TreadleProbe; "
                     "do sleep 0.02; done", timeout=30)
    found = sbx.get_application_windows("TreadleProbe")
    titles = [sbx.get_window_title(w) for w in found]
    sbx.left_click(640, 400)  # into it: openbox gives it the focus
    focused = sbx.get_current_window_id()
finally:
    probe.kill()
out(none=none, found=found, titles=titles, focused=focused)
""",
    )
    # None found: xdotool exits 1, which the SDK raises as it is.
    assert seen["none"]["type"] == "CommandExitException", seen
    assert len(seen["found"]) == 1 and seen["titles"] == ["probe title"], seen
    assert seen["focused"] == seen["found"][0]


def test_screen_size_needs_xrandr(sdk: SDK, created: dict[str, Any]) -> None:
    """get_screen_size() parses `xrandr`, which needs x11-xserver-utils on the node."""
    seen = drive(sdk, created, "out(size=await failure(sbx.get_screen_size))")
    if shutil.which("xrandr"):
        assert seen["size"] == {"type": None, "result": "(1280, 800)"}, seen
    else:
        assert seen["size"]["type"] == "CommandExitException", seen
        assert "xrandr: command not found" in seen["size"]["message"]


def test_the_stream_url_with_websockify_started_in_the_sandbox(
    sdk: SDK, created: dict[str, Any]
) -> None:
    """stream.start() refuses: the node's x11vnc (which treadle's own viewer uses) is what its
    `pgrep -x x11vnc` finds, and it would run noVNC from /opt/noVNC, which is not there.
    get_url() needs no start: with websockify serving Debian's noVNC on port 6080 in the
    sandbox, the URL it gives is served through Weaver's host-name routing."""
    port = sdk.cluster.url.rsplit(":", 1)[1]
    host = f"6080-{created['id']}.{DOMAIN}:{port}"
    assert created["start"] == {
        "type": "RuntimeError",
        "message": "Stream is already running",
        "status": None,
    }
    assert created["url"] == f"https://{host}/vnc.html?autoconnect=true&resize=scale"
    assert created["view_only"] == f"https://{host}/vnc.html?view_only=true&resize=scale"
    if not shutil.which("websockify"):
        pytest.skip("websockify is not installed (Debian's websockify)")
    started = drive(
        sdk,
        created,
        """
proxy = sbx.commands.run("websockify --web /usr/share/novnc 6080 localhost:5900",
                         background=True, timeout=0)
out(pid=proxy.pid, listening=await failure(lambda: sbx.commands.run(
    "until ss -Htln 'sport = :6080' | grep -q .; do sleep 0.05; done", timeout=30)))
""",
    )
    try:
        assert started["listening"]["type"] is None, started
        # A socket to Weaver stands for the wildcard DNS name (and TLS) a deployment has.
        with httpx.Client(base_url=sdk.cluster.url, timeout=30) as anyone:
            page = anyone.get("/vnc.html", headers={"host": host})
            assert page.status_code == 200 and "noVNC" in page.text
        weaver = socket.create_connection(("127.0.0.1", int(port)))
        with connect(f"ws://{host}/websockify", sock=weaver) as ws:
            assert ws.recv(timeout=30) == b"RFB 003.008\n"
    finally:
        killed = drive(sdk, created, f"out(killed=sbx.commands.kill({started['pid']}))")
        assert killed == {"killed": True}


def test_stream_stop_ends_the_vnc_server_and_ctrl_starts_it_again(sdk: SDK) -> None:
    """stream.stop() runs `pkill x11vnc` when `pgrep -x x11vnc` finds one: on treadle that is
    the desktop's own, which Weaver's stream bridges; ctrl starts it again. (A sandbox of its
    own: the module's keeps its VNC server.)"""
    seen = sdk.run(
        TREADLE_DESKTOP
        + """
sbx = TreadleDesktop.create(allow_internet_access=False, timeout=120)
try:
    first = sbx.commands.run("pgrep -x x11vnc").stdout.split()
    sbx.stream.stop()
    again = sbx.commands.run(
        f"until pgrep -x x11vnc | grep -vx {first[0]} >/dev/null; do sleep 0.05; done;"
        " until ss -Htln 'sport = :5900' | grep -q .; do sleep 0.05; done; pgrep -x x11vnc",
        timeout=60,
    ).stdout.split()
finally:
    sbx.kill()
out(first=first, again=again)
"""
    )
    assert len(seen["first"]) == 1 and len(seen["again"]) == 1, seen
    assert seen["again"] != seen["first"], seen  # a new one, listening


def test_connect_gives_actions_but_no_stream(sdk: SDK, created: dict[str, Any]) -> None:
    """The stream object is made by create() only: a sandbox connected to has none."""
    seen = drive(sdk, created, "out(stream=await failure(lambda: sbx.stream))")
    assert seen["stream"]["type"] == "AttributeError", seen
