"""Computer use, measured where the user sees it: a desktop sandbox's screenshot and input
through treadle's ctrl, against the process-per-action way (`xdotool` and `scrot` through
exec, and the file read back, as E2B's desktop SDK does), on the same sandbox, in one run.

    .venv/bin/python bench/desktop.py [--url URL] [-n 50] [--stream 20]

Against a running treadle (e.g. `treadle up`; the admin key found as the CLI finds it), one
desktop sandbox of 1280x800:

  * `api`: through Weaver's API with treadle's SDK (REST), end to end: a PNG and a JPEG
    (q80) screenshot, one click, typing 100 characters, and a batch of 10 actions answered
    with one PNG screenshot; also over the WebSocket session (`session`);
  * `exec`: the same through exec, a process per action: `xdotool mousemove X Y click 1`,
    `xdotool type` (E2B's way: 25 characters a call, `--delay 75`), `scrot` to a file then
    the file read back and removed;
  * `inside`: the same two ways measured inside the sandbox, without Weaver: ctrl's own
    protocol on its port, and the tools run in a loop by one shell (what spawning a process
    per action costs by itself);
  * `stream` (with `--stream N`, Playwright and chromium installed): a click in the viewer
    page until the pixel it changed is seen in the same page, N times.

Prints JSON: p50/p99 in ms for each, and the ratio process-per-action / ctrl of the p50s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from treadle import Sandbox
from treadle.client import Client

PYTHON = "/usr/bin/python3"
TEXT = ("The quick brown fox jumps over the lazy dog; 0123456789. " * 2)[:100]
BATCH: list[dict[str, Any]] = [
    {"type": "move", "x": 100, "y": 100},
    {"type": "click", "x": 200, "y": 150},
    {"type": "type", "text": "hello"},
    {"type": "key", "keys": "ctrl+a"},
    {"type": "scroll", "dy": 2, "x": 300, "y": 300},
    {"type": "click", "x": 400, "y": 200, "count": 2},
    {"type": "key", "keys": "Return"},
    {"type": "move", "x": 640, "y": 400},
    {"type": "type", "text": "world"},
    {"type": "key", "keys": "BackSpace"},
]
# xdotool's equivalents of BATCH, one process each (a shell word list per action).
BATCH_XDOTOOL = [
    "xdotool mousemove 100 100",
    "xdotool mousemove 200 150 click 1",
    "xdotool type --delay 75 hello",
    "xdotool key ctrl+a",
    "xdotool mousemove 300 300 click --repeat 2 5",
    "xdotool mousemove 400 200 click --repeat 2 1",
    "xdotool key Return",
    "xdotool mousemove 640 400",
    "xdotool type --delay 75 world",
    "xdotool key BackSpace",
]

# Inside the sandbox: ctrl's protocol on its port, and the tools in one shell's loop.
INSIDE = r"""
import json, os, socket, struct, subprocess, sys, time
n = int(sys.argv[1])
text = sys.argv[2]

def ask(conn, request):
    body = json.dumps(request).encode()
    conn.sendall(struct.pack(">I", len(body)) + body)
    def read(k):
        buf = b""
        while len(buf) < k:
            buf += conn.recv(k - len(buf))
        return buf
    h, p = struct.unpack(">II", read(8))
    head = json.loads(read(h)); read(p)
    return head

def timed(call):
    out = []
    for _ in range(n):
        t = time.perf_counter(); call(); out.append((time.perf_counter() - t) * 1000)
    return out

conn = socket.create_connection(("127.0.0.1", 49990))
seen = {
    "ctrl_png": timed(lambda: ask(conn, {"actions": [], "screenshot": {"format": "png"}})),
    "ctrl_jpeg": timed(lambda: ask(conn, {"actions": [],
                                          "screenshot": {"format": "jpeg", "quality": 80}})),
    "ctrl_click": timed(lambda: ask(conn, {"actions": [{"type": "click", "x": 10, "y": 10}]})),
    "ctrl_type_100": timed(lambda: ask(conn, {"actions": [{"type": "type", "text": text}]})),
}
def run(argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
seen["xdotool_click"] = timed(lambda: run(["xdotool", "mousemove", "10", "10", "click", "1"]))
seen["scrot_png"] = timed(lambda: (run(["scrot", "-o", "/tmp/bench.png"]),
                                   open("/tmp/bench.png", "rb").read(),
                                   os.unlink("/tmp/bench.png")))
print(json.dumps(seen))
"""

# The page's own clock: a click on the canvas until the pixel under it changes colour.
STREAM_PROBE = """async ([x, y]) => {
  const canvas = document.querySelector('#screen canvas');
  const context = canvas.getContext('2d', {willReadFrequently: true});
  const scale = canvas.width / canvas.getBoundingClientRect().width;
  const px = () => Array.from(context.getImageData(x * scale, y * scale, 1, 1).data).join();
  const before = px();
  const rect = canvas.getBoundingClientRect();
  const at = {clientX: rect.left + x, clientY: rect.top + y, bubbles: true, button: 0};
  const start = performance.now();
  canvas.dispatchEvent(new MouseEvent('mousedown', {...at, buttons: 1}));
  canvas.dispatchEvent(new MouseEvent('mouseup', {...at, buttons: 0}));
  while (px() === before) {
    await new Promise(r => requestAnimationFrame(r));
    if (performance.now() - start > 5000) return null;
  }
  return performance.now() - start;
}"""

# Inside the sandbox: a window over the screen that swaps its colour on every click.
TOGGLER = r"""
from Xlib import X, display
d = display.Display(); s = d.screen()
colours = [s.black_pixel, s.white_pixel]
w = s.root.create_window(0, 0, s.width_in_pixels, s.height_in_pixels, 0, s.root_depth,
                         X.InputOutput, X.CopyFromParent, background_pixel=colours[0],
                         override_redirect=True,
                         event_mask=X.ButtonPressMask | X.ExposureMask)
w.map(); d.sync(); print("ready", flush=True)
n = 0
while True:
    e = d.next_event()
    if e.type == X.ButtonPress:
        n += 1
        w.change_attributes(background_pixel=colours[n % 2]); w.clear_area(); d.flush()
"""


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p99": round(p99, 2), "n": len(values)}


def timed(n: int, call: Callable[[], object]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def xdotool_type(sbx: Sandbox, text: str) -> None:
    # E2B's desktop SDK: 25 characters a call, 75 ms between keys
    for start in range(0, len(text), 25):
        chunk = text[start : start + 25].replace("'", "'\\''")
        sbx.run(f"xdotool type --delay 75 '{chunk}'")


def scrot(sbx: Sandbox) -> bytes:
    sbx.run("scrot -o /tmp/shot.png")
    data = sbx.files.read("/tmp/shot.png")
    sbx.files.remove("/tmp/shot.png")
    return data


def through_api(sbx: Sandbox, n: int) -> dict[str, list[float]]:
    desk = sbx.desktop
    seen = {
        "png": timed(n, lambda: desk.screenshot()),
        "jpeg": timed(n, lambda: desk.screenshot(format="jpeg", quality=80)),
        "click": timed(n, lambda: desk.click(10, 10)),
        "type_100": timed(max(3, n // 5), lambda: desk.type(TEXT)),
        "batch_10_png": timed(n, lambda: desk.batch(BATCH, screenshot=True)),
    }
    return seen


def through_session(url: str, key: str, sbx: Sandbox, n: int) -> dict[str, list[float]]:
    from websockets.sync.client import connect

    target = url.replace("http", "ws", 1) + f"/v1/sandboxes/{sbx.id}/desktop/session"
    seen: dict[str, list[float]] = {}
    with connect(target, additional_headers={"Authorization": f"Bearer {key}"}) as ws:

        def ask(body: dict[str, Any], images: int) -> None:
            ws.send(json.dumps(body))
            ws.recv(timeout=60)
            for _ in range(images):
                ws.recv(timeout=60)

        seen["png"] = timed(n, lambda: ask({"screenshot": True}, 1))
        click = {"actions": [{"type": "click", "x": 10, "y": 10}]}
        seen["click"] = timed(n, lambda: ask(click, 0))
        seen["batch_10_png"] = timed(n, lambda: ask({"actions": BATCH, "screenshot": True}, 1))
    return seen


def through_exec(sbx: Sandbox, n: int) -> dict[str, list[float]]:
    return {
        "png": timed(n, lambda: scrot(sbx)),
        "click": timed(n, lambda: sbx.run("xdotool mousemove 10 10 click 1")),
        "type_100": timed(max(3, n // 5), lambda: xdotool_type(sbx, TEXT)),
        "batch_10_png": timed(
            max(3, n // 5), lambda: ([sbx.run(step) for step in BATCH_XDOTOOL], scrot(sbx))
        ),
    }


def stream_latency(sbx: Sandbox, n: int) -> list[float] | str:
    chromium = shutil.which("chromium")
    if chromium is None:
        return "chromium is not installed"
    from playwright.sync_api import sync_playwright

    toggler = sbx.exec([PYTHON, "-c", TOGGLER], tag="toggler")
    for stream, data in toggler:
        if stream == "stdout" and b"ready" in data:
            break
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--headless=new", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 826})
            page.goto(sbx.desktop.stream_url(view_only=False, expires_in=600))
            page.wait_for_selector("body[data-state=connected]", timeout=30_000)
            page.wait_for_timeout(500)  # the first full frame
            seen = [page.evaluate(STREAM_PROBE, [300 + i, 300]) for i in range(n)]
            browser.close()
    finally:
        sbx.signal_process("toggler", 9)
    return [v for v in seen if v is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None)
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--stream", type=int, default=20)
    args = parser.parse_args()
    client = Client(url=args.url)
    url, key = client.config.url, client.config.api_key or ""
    sbx = Sandbox.create(client=client, desktop={"width": 1280, "height": 800}, timeout=1800)
    try:
        sbx.wait_for_status("running", timeout=120)
        sbx.desktop.screenshot()  # warm
        api = through_api(sbx, args.n)
        session = through_session(url, key, sbx, args.n)
        by_exec = through_exec(sbx, args.n)
        inside = json.loads(sbx.run([PYTHON, "-c", INSIDE, str(args.n), TEXT]).stdout)
        stream = stream_latency(sbx, args.stream) if args.stream else "not measured"
    finally:
        sbx.kill()
        client.close()
    report: dict[str, Any] = {
        "api": {k: stats(v) for k, v in api.items()},
        "session": {k: stats(v) for k, v in session.items()},
        "exec": {k: stats(v) for k, v in by_exec.items()},
        "inside": {k: stats(v) for k, v in inside.items()},
        "stream_click_to_pixel": stats(stream) if isinstance(stream, list) else stream,
    }
    report["ratio_exec_over_api"] = {
        k: round(report["exec"][k]["p50"] / report["api"][k]["p50"], 1) for k in by_exec
    }
    inner = report["inside"]
    report["ratio_inside_tool_over_ctrl"] = {
        "click": round(inner["xdotool_click"]["p50"] / inner["ctrl_click"]["p50"], 1),
        "png": round(inner["scrot_png"]["p50"] / inner["ctrl_png"]["p50"], 1),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
