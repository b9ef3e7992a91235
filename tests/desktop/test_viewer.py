"""stream in a real browser: the viewer page Weaver serves opens the sandbox's screen with
noVNC over Weaver's WebSocket bridge, through the node's link. A controlling viewer's clicks
and keys reach the program in the sandbox exactly; a view-only viewer's never do; without a
valid signed URL there is nothing to see. The browser is the system's chromium, driven by
Playwright (which downloads no browser of its own)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from desktop.programs import Recorder
from support.cluster import Cluster
from treadle.client import Sandbox
from treadle.weaver.services import port_access

pytestmark = [pytest.mark.integration, pytest.mark.desktop]

CHROMIUM = shutil.which("chromium")
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BAR = 26  # the viewer page's status bar, above the screen


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # Exactly the screen's size below the bar: noVNC then shows it at scale 1.
    context = browser.new_context(viewport={"width": 640, "height": 400 + BAR})
    try:
        yield context.new_page()
    finally:
        context.close()


def open_viewer(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-state=connected]", timeout=20_000)
    page.wait_for_function(_NOT_BLANK, timeout=20_000)


# The canvas shows the screen: some pixel of it is not black (the recorder's window is white).
_NOT_BLANK = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return false;
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 0; i < pixels.length; i += 4 * 97) {
    if (pixels[i] || pixels[i + 1] || pixels[i + 2]) return true;
  }
  return false;
}"""


def test_a_controlling_viewer_s_input_reaches_the_program(
    desktop: Sandbox, recorder: Recorder, page: Any
) -> None:
    open_viewer(page, desktop.desktop.stream_url(view_only=False, expires_in=300))
    page.mouse.click(40, BAR + 30)
    page.keyboard.type("Hi!")
    assert recorder.take(2) == [
        {"event": "press", "button": 1, "x": 40, "y": 30},
        {"event": "release", "button": 1, "x": 40, "y": 30},
    ]
    assert recorder.typed(recorder.take_text(3)) == "Hi!"


def test_a_view_only_viewer_sees_and_cannot_touch(
    desktop: Sandbox, recorder: Recorder, browser: Any
) -> None:
    watcher = browser.new_context(viewport={"width": 640, "height": 400 + BAR})
    try:
        page = watcher.new_page()
        open_viewer(page, desktop.desktop.stream_url(view_only=True, expires_in=300))
        assert page.inner_text("#status") == "live · view only"
        # The page is told it may only watch; a hostile one sends input all the same.
        page.evaluate("window.rfb.viewOnly = false")
        page.mouse.click(40, BAR + 30)
        page.keyboard.type("nope")
    finally:
        watcher.close()  # what it sent went before its stream ended
    # Then a controlling viewer clicks: that is the first input the program gets.
    controller = browser.new_context(viewport={"width": 640, "height": 400 + BAR})
    try:
        page = controller.new_page()
        open_viewer(page, desktop.desktop.stream_url(view_only=False, expires_in=300))
        page.mouse.click(7, BAR + 9)
        assert recorder.take(2) == [
            {"event": "press", "button": 1, "x": 7, "y": 9},
            {"event": "release", "button": 1, "x": 7, "y": 9},
        ]
    finally:
        controller.close()


def test_several_viewers_watch_at_once(desktop: Sandbox, recorder: Recorder, browser: Any) -> None:
    url = desktop.desktop.stream_url(view_only=True, expires_in=300)
    contexts = [browser.new_context(viewport={"width": 640, "height": 400 + BAR}) for _ in range(3)]
    try:
        pages = [context.new_page() for context in contexts]
        for viewer in pages:
            open_viewer(viewer, url)
        for viewer in pages:  # a later viewer pushed none of the earlier ones off
            assert viewer.eval_on_selector("body", "b => b.dataset.state") == "connected"
    finally:
        for context in contexts:
            context.close()


def test_without_a_valid_url_there_is_nothing_to_see(
    desktop_cluster: Cluster, desktop: Sandbox
) -> None:
    url = desktop.desktop.stream_url(view_only=False, expires_in=300)
    base, _, query = url.partition("?")
    forged = url.replace("treadle_signature=", "treadle_signature=0")
    token = desktop.refresh()["access_token"]
    past = int(time.time()) - 5
    expired = (
        f"{base}?view_only=0&treadle_expires={past}"
        f"&treadle_signature={port_access.sign(token, desktop.id, 'desktop-control', past)}"
    )
    watch_only = desktop.desktop.stream_url(view_only=True, expires_in=300)
    with httpx.Client(timeout=30) as anyone:
        assert anyone.get(url).status_code == 200
        assert anyone.get(base).status_code == 401
        assert anyone.get(forged).status_code == 403
        assert anyone.get(expired).status_code == 403
        # A view-only URL asking for control still only watches.
        page = anyone.get(watch_only.replace("view_only=1", "view_only=0"))
        assert page.status_code == 200 and "const viewOnly = true;" in page.text
    # The stream itself: refused before a byte of the screen is sent.
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    ws_base = desktop_cluster.url.replace("http", "ws", 1)
    vnc = f"{ws_base}/v1/sandboxes/{desktop.id}/desktop/vnc"
    for credentials in ("", "?" + forged.partition("?")[2], "?" + expired.partition("?")[2]):
        with (
            pytest.raises((InvalidStatus, WebSocketException)),
            connect(vnc + credentials, open_timeout=10) as websocket,
        ):
            websocket.recv(timeout=10)
    with connect(f"{vnc}?{query}") as websocket:
        assert websocket.recv(timeout=10) == b"RFB 003.008\n"
