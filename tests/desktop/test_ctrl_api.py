"""ctrl through Weaver's API, on a desktop sandbox of the namespace tier: what a program draws
is what a screenshot shows, input arrives exactly and in order, a batch answers with one
screenshot, and what is not valid is a 4xx naming the field."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from desktop.programs import DRAWER, SANDBOX_PYTHON, Recorder
from support.cluster import Cluster, eventually
from treadle.client import Client, Sandbox, TreadleAPIError

pytestmark = [pytest.mark.integration, pytest.mark.desktop]


def test_a_screenshot_shows_what_a_program_drew(desktop: Sandbox) -> None:
    drawer = desktop.exec([SANDBOX_PYTHON, "-c", DRAWER, "100", "80", "120", "60", "ff8000"])
    try:
        out = b""
        for stream, data in drawer:
            out += data if stream == "stdout" else b""
            if b"drawn" in out:
                break
        png = Image.open(io.BytesIO(desktop.desktop.screenshot()))
        assert (png.format, png.size) == ("PNG", (640, 400))
        rgb = png.convert("RGB")
        inside = {rgb.getpixel((x, y)) for x in range(100, 220, 7) for y in range(80, 140, 7)}
        assert inside == {(255, 128, 0)}
        assert rgb.getpixel((99, 79)) != (255, 128, 0)
        assert rgb.getpixel((220, 140)) != (255, 128, 0)

        # A region, scaled, and JPEG
        part = Image.open(io.BytesIO(desktop.desktop.screenshot(region=(100, 80, 120, 60))))
        assert part.size == (120, 60) and part.convert("RGB").getpixel((60, 30)) == (255, 128, 0)
        half = Image.open(io.BytesIO(desktop.desktop.screenshot(scale=0.5)))
        assert half.size == (320, 200)
        jpeg = Image.open(io.BytesIO(desktop.desktop.screenshot(format="jpeg", quality=90)))
        assert jpeg.format == "JPEG" and jpeg.size == (640, 400)
        r, g, b = jpeg.convert("RGB").getpixel((160, 110))
        assert r > 230 and 100 < g < 160 and b < 40  # JPEG: near the colour, not exact
    finally:
        drawer.kill()
        drawer.close()


def test_input_arrives_exactly_and_in_order(desktop: Sandbox, recorder: Recorder) -> None:
    screen = desktop.desktop
    screen.click(10, 20)
    assert recorder.take(2) == [
        {"event": "press", "button": 1, "x": 10, "y": 20},
        {"event": "release", "button": 1, "x": 10, "y": 20},
    ]
    text = "héllo Wörld ✓ Ω 東京 — ¿qué?\tend\n"
    screen.type(text)
    typed = recorder.take_text(len(text))
    assert recorder.typed(typed) == text
    # each key pressed and released before the next (Shift around capitals)
    keys = [e for e in typed if e["text"]]
    assert [e["event"] for e in keys] == ["key_press", "key_release"] * len(text)

    screen.key("ctrl+shift+t")
    chord = recorder.take(6)
    assert [(e["event"], e["key"]) for e in chord] == [
        ("key_press", "Control_L"),
        ("key_press", "Shift_L"),
        ("key_press", "T"),
        ("key_release", "T"),
        ("key_release", "Shift_L"),
        ("key_release", "Control_L"),
    ]
    assert chord[2]["state"] & 0x5 == 0x5  # Shift and Control held when the key came

    # One batch: in order, answered with one screenshot and the pointer where it ended.
    result = screen.batch(
        [
            {"type": "click", "x": 30, "y": 40, "button": "right"},
            {"action": "type", "text": "ab"},
            {"action": "scroll", "coordinate": [50, 60], "scroll_direction": "down"},
            {"type": "cursor"},
        ],
        screenshot={"format": "jpeg", "quality": 60},
    )
    events = recorder.take(2 + 4 + 6)
    assert [(e["event"], e.get("button"), e.get("text")) for e in events] == [
        ("press", 3, None),
        ("release", 3, None),
        ("key_press", None, "a"),
        ("key_release", None, "a"),
        ("key_press", None, "b"),
        ("key_release", None, "b"),
        *[("press", 5, None), ("release", 5, None)] * 3,
    ]
    assert result.results[-1] == [50, 60] and result.cursor == (50, 60)
    assert result.image is not None and result.image[:2] == b"\xff\xd8"
    assert result.screenshot is not None
    assert (result.screenshot["width"], result.screenshot["height"]) == (640, 400)


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"actions": [{"type": "click", "x": 640, "y": 0}]}, ["body", "actions", 0, "x"], "off"),
        ({"actions": [{"type": "key", "keys": "ctrl+bogus"}]}, ["body", "actions", 0], "bogus"),
        ({"actions": [{"action": "left_click", "coordinate": [1, 400]}]}, None, "off"),
        ({"actions": [{"type": "move", "x": 1.5, "y": 2}]}, None, "integer"),
        ({"screenshot": {"format": "gif"}}, None, "png"),
        ({"screenshot": {"region": [600, 0, 100, 10]}}, ["body", "screenshot", "region"], "off"),
        ({"actions": [{"type": "cursor"}] * 101}, None, "at most 100"),
    ],
)
def test_what_is_not_valid_is_a_422_naming_the_field(
    desktop_cluster: Cluster, desktop: Sandbox, body: dict, loc: list | None, words: str
) -> None:
    with desktop_cluster.client() as http:
        answer = http.post(f"/v1/sandboxes/{desktop.id}/desktop/actions", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert words in json.dumps(error), error
    if loc is not None:
        assert error["details"][0]["loc"] == loc


def test_query_parameters_of_a_screenshot_are_checked(
    desktop_cluster: Cluster, desktop: Sandbox
) -> None:
    with desktop_cluster.client() as http:
        base = f"/v1/sandboxes/{desktop.id}/desktop/screenshot"
        for query in ("format=bmp", "quality=0", "scale=2", "x=1&y=1", "scale=nan"):
            answer = http.get(f"{base}?{query}")
            assert answer.status_code == 422, (query, answer.text)
        assert http.get(f"{base}?x=630&y=0&width=20&height=5").status_code == 422


def test_only_the_sandbox_s_tenant_or_token_reach_its_screen(
    desktop_cluster: Cluster, desktop: Sandbox
) -> None:
    with desktop_cluster.client() as admin:
        other = admin.post("/v1/tenants", json={"name": "desk-other"}).json()["api_key"]
        token = admin.get(f"/v1/sandboxes/{desktop.id}").json()["access_token"]
    path = f"/v1/sandboxes/{desktop.id}/desktop/screenshot"
    with desktop_cluster.client(other) as stranger:
        assert stranger.get(path).status_code == 404
    with httpx.Client(base_url=desktop_cluster.url, timeout=30) as anyone:
        assert anyone.get(path).status_code == 401
        assert anyone.get(path, headers={"X-Treadle-Access-Token": "nope"}).status_code == 403
        shot = anyone.get(path, headers={"X-Treadle-Access-Token": token})
        assert shot.status_code == 200 and shot.content[:4] == b"\x89PNG"


def test_a_sandbox_without_a_desktop_says_so(client: Client) -> None:
    plain = Sandbox.create(client=client, timeout=120)
    try:
        plain.wait_for_status("running", timeout=60)
        with pytest.raises(TreadleAPIError) as refused:
            plain.desktop.screenshot()
        assert refused.value.status == 409 and "no desktop" in str(refused.value)
    finally:
        plain.kill()


def test_the_desktop_s_own_processes_leave_the_sandbox_idle(
    desktop_cluster: Cluster, desktop: Sandbox
) -> None:
    def reasons() -> list[str] | None:
        awake = desktop.refresh().get("awake")
        return None if awake is None else list(awake["reasons"])

    # Xvfb, the window manager, x11vnc and ctrl run, yet nothing is work.
    eventually(lambda: reasons() == [], timeout=30, what="the desktop sandbox to be idle")


def test_a_session_keeps_one_connection_and_sends_only_what_changed(
    desktop_cluster: Cluster, desktop: Sandbox
) -> None:
    from websockets.sync.client import connect

    url = desktop_cluster.url.replace("http", "ws", 1)
    url += f"/v1/sandboxes/{desktop.id}/desktop/session"
    changed = json.dumps({"screenshot": {"changed_only": True}})
    auth = {"Authorization": f"Bearer {desktop_cluster.admin_key}"}
    with connect(url, additional_headers=auth, open_timeout=30) as session:
        session.send(changed)  # the first: all of the screen
        first = json.loads(session.recv(timeout=30))
        assert first["screenshot"]["region"] == [0, 0, 640, 400]
        assert Image.open(io.BytesIO(session.recv(timeout=30))).size == (640, 400)

        session.send(changed)  # nothing changed: no image
        assert json.loads(session.recv(timeout=30))["screenshot"]["unchanged"] is True

        drawer = desktop.exec([SANDBOX_PYTHON, "-c", DRAWER, "200", "100", "40", "30", "00ff00"])
        try:
            for stream, data in drawer:
                if stream == "stdout" and b"drawn" in data:
                    break
            session.send(changed)
            box = json.loads(session.recv(timeout=30))["screenshot"]
            assert box["region"] == [200, 100, 40, 30]
            patch = Image.open(io.BytesIO(session.recv(timeout=30))).convert("RGB")
            assert patch.size == (40, 30) and patch.getpixel((20, 15)) == (0, 255, 0)
        finally:
            drawer.kill()
            drawer.close()

        # A bad message is answered, and the session goes on.
        session.send(json.dumps({"actions": [{"type": "click", "x": 9999, "y": 0}]}))
        error = json.loads(session.recv(timeout=30))["error"]
        assert error["code"] == "invalid_request" and error["details"][0]["loc"][-1] == "x"
        session.send(json.dumps({"actions": [{"type": "size"}]}))
        assert json.loads(session.recv(timeout=30))["results"] == [[640, 400]]


def test_a_viewer_keeps_the_sandbox_awake(desktop_cluster: Cluster, desktop: Sandbox) -> None:
    from websockets.sync.client import connect

    def reasons() -> list[str] | None:
        awake = desktop.refresh().get("awake")
        return None if awake is None else list(awake["reasons"])

    eventually(lambda: reasons() == [], timeout=30, what="the desktop sandbox to be idle")
    url = desktop.desktop.stream_url(view_only=True, expires_in=300)
    vnc = url.replace("http", "ws", 1).replace("/desktop/view?", "/desktop/vnc?")
    with connect(vnc, open_timeout=30) as viewer:
        assert viewer.recv(timeout=10) == b"RFB 003.008\n"
        eventually(
            lambda: reasons() == ["1 proxied connection open"],
            timeout=30,
            what="the viewer to keep it awake",
        )
    eventually(lambda: reasons() == [], timeout=30, what="it to be idle once the viewer left")


HOSTILE_CTRL = r"""
import socket, struct, sys
answers = {
    "huge": struct.pack(">II", 0xFFFFFFFF, 0),
    "not-json": struct.pack(">II", 5, 0) + b"nope!",
    "a-list": struct.pack(">II", 2, 0) + b"[]",
    "close": b"",
}
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 49990))
listener.listen(8)
print("listening", flush=True)
for name in sys.argv[1:]:
    conn, _ = listener.accept()
    conn.recv(65536)
    conn.sendall(answers[name])
    conn.close()
"""


def test_a_ctrl_that_lies_cannot_harm_weaver(desktop_cluster: Cluster, client: Client) -> None:
    sandbox = Sandbox.create(client=client, desktop={"width": 320, "height": 200}, timeout=300)
    try:
        sandbox.wait_for_status("running", timeout=60)
        # The desktop is the tenant's: it can end ctrl and put its own program on its port.
        # ([c]: the pattern must not match this shell's own command line)
        ended = sandbox.run(
            "pkill -f 'libexec/[c]trl.py'; while pgrep -f 'libexec/[c]trl.py'; do :; done"
        )
        assert ended.exit_code == 0, ended
        answers = ["huge", "not-json", "a-list", "close"]
        liar = sandbox.exec([SANDBOX_PYTHON, "-c", HOSTILE_CTRL, *answers])
        try:
            for stream, data in liar:
                if stream == "stdout" and b"listening" in data:
                    break
            with desktop_cluster.client() as http:
                path = f"/v1/sandboxes/{sandbox.id}/desktop/actions"
                for answer in answers:
                    said = http.post(path, json={"actions": [{"type": "size"}]})
                    assert said.status_code == 502, (answer, said.text)
                # Nothing listens now: a clear "not serving", retry-safe.
                gone = http.post(path, json={"actions": [{"type": "size"}]})
                assert gone.status_code == 503, gone.text
                assert http.get("/healthz").status_code == 200
        finally:
            liar.kill()
            liar.close()
    finally:
        sandbox.kill()


def test_the_desktop_s_ports_are_not_plain_ports(desktop_cluster: Cluster, client: Client) -> None:
    # Not even for a sandbox whose ports are public: VNC there would be control, unfiltered.
    sandbox = Sandbox.create(
        client=client, desktop={"width": 320, "height": 200}, public_ports=True, timeout=300
    )
    try:
        sandbox.wait_for_status("running", timeout=60)
        with (
            desktop_cluster.client() as http,
            httpx.Client(base_url=desktop_cluster.url, timeout=30) as anyone,
        ):
            for port in (5900, 49990):
                path = f"/v1/sandboxes/{sandbox.id}/ports/{port}/"
                assert http.get(path).status_code == 403
                assert anyone.get(path).status_code == 403
                signed = http.post(f"/v1/sandboxes/{sandbox.id}/urls", json={"port": port})
                assert signed.status_code == 403, signed.text
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        ws = desktop_cluster.url.replace("http", "ws", 1)
        with pytest.raises(InvalidStatus):
            connect(f"{ws}/v1/sandboxes/{sandbox.id}/ports/5900/", subprotocols=["binary"])
    finally:
        sandbox.kill()
