"""Work that outlives its client in a sandbox: processes listed, re-attached to and timed out;
servers inside reached through Weaver's port proxy; the idle timeout that sees running work.
A real Weaver and Shuttle over loopback, and real servers started by exec."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support.cluster import Cluster, eventually
from support.sandboxes import create, run, socket_to, start

pytestmark = pytest.mark.integration

# An HTTP server that answers each request with what it saw (method, path, headers, body),
# and streams /stream in pieces; stdlib only, as a sandbox's code would be.
HTTP_SERVER = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        size = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(size).decode("latin-1")
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(3):
                piece = ("part %d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        seen = json.dumps({"method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": body}).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("content-type", "application/json")
        self.send_header("set-cookie", "a=1")
        self.send_header("set-cookie", "b=2")
        self.send_header("content-length", str(len(seen)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(seen)
    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("listening", flush=True)
s.serve_forever()
"""

# A WebSocket echo server (RFC 6455), stdlib only: text frames come back upper-cased,
# binary ones as they are; the subprotocol offered first is chosen.
WS_SERVER = r"""
import base64, hashlib, socket, struct, sys, threading
def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    lines = head.decode().split("\r\n")
    h = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    accept = base64.b64encode(hashlib.sha1((h["sec-websocket-key"] +
        "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    proto = h.get("sec-websocket-protocol", "").split(",")[0].strip()
    extra = "Sec-WebSocket-Protocol: %s\r\n" % proto if proto else ""
    c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s"
               "X-Path: %s\r\n\r\n" % (accept, extra, lines[0].split()[1])).encode())
    f = c.makefile("rb")
    while True:
        b1, b2 = f.read(2)
        op, n = b1 & 15, b2 & 127
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        elif n == 127: n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4)
        data = bytes(x ^ mask[i % 4] for i, x in enumerate(f.read(n)))
        if op == 8:
            c.sendall(b"\x88\x02" + data[:2]); c.close(); return
        out = data.upper() if op == 1 else data
        size = len(out)
        if size < 126: length = bytes([size])
        elif size < 65536: length = b"\x7e" + struct.pack(">H", size)
        else: length = b"\x7f" + struct.pack(">Q", size)
        hdr = bytes([0x80 | op]) + length
        c.sendall(hdr + out)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def read_until(ws: Any, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        message = json.loads(ws.recv())
        assert "stdout" in message, message
        seen += base64.b64decode(message["stdout"])
    return seen


def serve(cluster: Cluster, sandbox_id: str, script: str, port: int) -> None:
    """Start `script` on `port` in the background, with exec, and wait until it listens."""
    with socket_to(cluster, f"/v1/sandboxes/{sandbox_id}/exec") as ws:
        start(ws, cmd=["python3", "-c", script, str(port)], tag=f"server-{port}")
        read_until(ws, b"listening")


def test_processes_are_listed_reattached_and_signalled(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        sid = sandbox["id"]
        # A process whose client leaves runs on, and what it writes meanwhile is kept.
        with socket_to(cluster, f"/v1/sandboxes/{sid}/exec") as ws:
            started = start(
                ws,
                cmd="echo first; read go; echo after $go; exec sleep 600",
                tag="worker",
            )
            assert started["tag"] == "worker"
            read_until(ws, b"first")
        pid = started["pid"]
        listed = api.get(f"/v1/sandboxes/{sid}/processes").json()["items"]
        mine = [p for p in listed if p["pid"] == pid]
        assert mine and mine[0]["running"] and mine[0]["tag"] == "worker"

        # Attach by tag: stdin reaches it, and its output comes live.
        with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/worker") as ws:
            assert json.loads(ws.recv()) == {"started": {"pid": pid, "tag": "worker"}}
            ws.send(json.dumps({"stdin": base64.b64encode(b"now\n").decode()}))
            assert read_until(ws, b"after now") == b"after now\n"

        # Output written while nobody follows is kept for the next attach, by pid.
        run(api, sid, f"echo meanwhile > /proc/{pid}/fd/1")
        with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/{pid}") as ws:
            assert json.loads(ws.recv())["started"]["pid"] == pid
            assert read_until(ws, b"meanwhile") == b"meanwhile\n"
            # Another client attaching takes the process over.
            with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/{pid}") as other:
                assert json.loads(other.recv())["started"]["pid"] == pid
                taken = json.loads(ws.recv())
                assert "another client attached" in taken["exit"]["error"]
                signalled = api.post(
                    f"/v1/sandboxes/{sid}/processes/worker/signal", json={"signal": 15}
                )
                assert signalled.status_code == 200, signalled.text
                assert signalled.json()["pid"] == pid
                end = json.loads(other.recv())
                assert end["exit"]["signal"] == 15 and end["exit"]["error"] is None
        ended = api.get(f"/v1/sandboxes/{sid}/processes").json()["items"]
        assert [p["running"] for p in ended if p["pid"] == pid] == [False]

        # Unknown processes are 404s; a bad signal a 422.
        assert (
            api.post(
                f"/v1/sandboxes/{sid}/processes/nosuchtag/signal", json={"signal": 9}
            ).status_code
            == 404
        )
        assert (
            api.post(f"/v1/sandboxes/{sid}/processes/{pid}/signal", json={"signal": 65}).status_code
            == 422
        )
        with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/999999") as ws:
            assert json.loads(ws.recv())["error"]["code"] == "not_found"
        api.delete(f"/v1/sandboxes/{sid}")


def test_leaving_a_process_that_floods_its_output_leaves_the_node_answering(
    cluster: Cluster,
) -> None:
    """A client that stops reading a chatty process and leaves: the node keeps what the
    process writes for whoever attaches next, and goes on serving everything else (a Shuttle
    once spun here, between the stream it was sending to and the one that had left)."""
    with cluster.client() as api:
        sid = create(api)["id"]
        pids = []
        for round in range(3):
            with socket_to(cluster, f"/v1/sandboxes/{sid}/exec") as ws:
                pids.append(start(ws, cmd=["yes", f"flood {round}"])["pid"])
                read_until(ws, f"flood {round}".encode())
                # Reads no more: the window fills, and the node waits to send the rest.
        assert run(api, sid, "echo still here")["stdout"] == "still here\n"
        with socket_to(cluster, f"/v1/sandboxes/{sid}/processes/{pids[0]}") as ws:
            assert json.loads(ws.recv())["started"]["pid"] == pids[0]
            assert read_until(ws, b"flood 0").count(b"flood 0") >= 1  # kept, then live
        node = api.get(f"/v1/sandboxes/{sid}").json()["node_id"]
        assert next(n for n in api.get("/v1/nodes").json()["items"] if n["id"] == node)["connected"]
        for pid in pids:
            api.post(f"/v1/sandboxes/{sid}/processes/{pid}/signal", json={"signal": 9})
        api.delete(f"/v1/sandboxes/{sid}")


def test_a_process_ends_at_its_own_timeout(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        waited = run(api, sandbox["id"], "echo begun; exec sleep 600", timeout_s=0.5)
        assert waited["stdout"] == "begun\n"
        assert (waited["timed_out"], waited["signal"], waited["exit_code"]) == (True, 9, None)
        # The node enforces it: a streamed process whose client left is killed all the same.
        with socket_to(cluster, f"/v1/sandboxes/{sandbox['id']}/exec") as ws:
            pid = start(ws, cmd="exec sleep 600", tag="bounded", timeout_s=0.5)["pid"]

        def ended() -> dict[str, Any] | None:
            items = api.get(f"/v1/sandboxes/{sandbox['id']}/processes").json()["items"]
            done = [p for p in items if p["pid"] == pid and not p["running"]]
            return done[0] if done else None

        seen = eventually(ended, what="the process to be killed at its timeout")
        assert seen["timed_out"] and seen["signal"] == 9
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_an_http_server_in_a_sandbox_through_the_proxy(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        sid = sandbox["id"]
        serve(cluster, sid, HTTP_SERVER, 8080)
        base = f"/v1/sandboxes/{sid}/ports/8080"

        # With the API key: the request reaches the server as sent, without Weaver's
        # credentials, and its answer comes back whole (status, repeated headers, body).
        got = api.post(f"{base}/echo/p?x=1&y=%2F", content=b"payload", headers={"x-a": "b"})
        assert got.status_code == 201, got.text
        seen = got.json()
        assert (seen["method"], seen["path"], seen["body"]) == (
            "POST",
            "/echo/p?x=1&y=%2F",
            "payload",
        )
        assert seen["headers"]["x-a"] == "b"
        assert "authorization" not in seen["headers"]
        assert seen["headers"]["x-forwarded-prefix"] == base
        assert got.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert api.head(f"{base}/").status_code == 200
        streamed = api.get(f"{base}/stream")
        assert streamed.text == "part 0\npart 1\npart 2\n"

        # Nothing listens there: a 502 naming the port.
        closed = api.get(f"/v1/sandboxes/{sid}/ports/8081/")
        assert closed.status_code == 502 and closed.json()["error"]["details"]["port"] == 8081

        # Without the API key: the sandbox's access token, or a signed URL.
        token = sandbox["access_token"]
        with httpx.Client(base_url=cluster.url) as anonymous:
            assert anonymous.get(f"{base}/").status_code == 401
            assert (
                anonymous.get(f"{base}/", headers={"x-treadle-access-token": "sbt_x"}).status_code
                == 403
            )
            by_token = anonymous.get(f"{base}/a", headers={"x-treadle-access-token": token})
            assert by_token.status_code == 200
            assert "x-treadle-access-token" not in by_token.json()["headers"]
            by_query = anonymous.get(f"{base}/a", params={"treadle_token": token, "k": "v"})
            assert by_query.json()["path"] == "/a?k=v"

            signed = api.post(f"/v1/sandboxes/{sid}/urls", json={"port": 8080, "path": "/s?q=1"})
            assert signed.status_code == 200, signed.text
            url = signed.json()["url"]
            opened = anonymous.get(url)
            assert opened.status_code == 200 and opened.json()["path"] == "/s?q=1"
            # The cookie it set opens the pages it links to, under that port only.
            assert anonymous.get(f"{base}/linked").status_code == 200
            assert anonymous.get(f"/v1/sandboxes/{sid}/ports/8081/").status_code == 401
            anonymous.cookies.clear()
            tampered = url.replace("treadle_signature=", "treadle_signature=0")
            assert anonymous.get(tampered).status_code == 403
            other_port = url.replace("/ports/8080/", "/ports/8081/")
            assert anonymous.get(other_port).status_code == 403
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
            expired = api.post(
                f"/v1/sandboxes/{sid}/urls", json={"port": 8080, "expires_in_s": 0.001}
            ).json()["url"]
            eventually(
                lambda: (
                    int(query["treadle_expires"]) >= 0
                    and time.time()
                    > int(
                        dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(expired).query))[
                            "treadle_expires"
                        ]
                    )
                ),
                what="the short URL to expire",
            )
            assert anonymous.get(expired).status_code == 403
            # A sandbox that is not there looks the same as a wrong token.
            assert (
                anonymous.get(
                    "/v1/sandboxes/sbx_nothere/ports/8080/", params={"treadle_token": token}
                ).status_code
                == 403
            )

        # Another tenant's key opens nothing.
        other = api.post("/v1/tenants", json={"name": f"other-{sid}"}).json()["api_key"]
        with cluster.client(other) as stranger:
            assert stranger.get(f"{base}/").status_code == 404
        for bad in ("/ports/0/", "/ports/65536/"):
            assert api.get(f"/v1/sandboxes/{sid}{bad}").status_code == 422
        assert (
            api.post(
                f"/v1/sandboxes/{sid}/urls", json={"port": 8080, "expires_in_s": 1e9}
            ).status_code
            == 422
        )
        api.delete(f"/v1/sandboxes/{sid}")


def test_a_websocket_server_in_a_sandbox_through_the_proxy(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        sid = sandbox["id"]
        serve(cluster, sid, WS_SERVER, 9000)
        url = cluster.url.replace("http", "ws", 1) + f"/v1/sandboxes/{sid}/ports/9000/chat?room=1"
        headers = {"Authorization": f"Bearer {cluster.admin_key}"}
        with connect(url, additional_headers=headers, subprotocols=["echo.v1"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "echo.v1"
            ws.send("hello")
            assert ws.recv() == "HELLO"
            big = bytes(range(256)) * 1024  # 256 KiB: several frames on the way
            ws.send(big)
            assert ws.recv() == big
        # By access token in the query, as a browser would.
        token = sandbox["access_token"]
        with connect(f"{url}&treadle_token={token}") as ws:
            ws.send("again")
            assert ws.recv() == "AGAIN"
        with pytest.raises(InvalidStatus) as refused:
            connect(url).close()
        assert refused.value.response.status_code == 403
        api.delete(f"/v1/sandboxes/{sid}")


def test_the_idle_timeout_sees_running_work(cluster: Cluster) -> None:
    with cluster.client() as api:
        idle = create(api, idle_timeout_s=5)
        busy = create(api, idle_timeout_s=5)
        # Work that no exec stream follows: a background job of a finished command.
        run(api, busy["id"], "(sleep 60 && echo done > done.txt) >/dev/null 2>&1 &")
        run(api, idle["id"], "true")

        def awake(sandbox_id: str) -> dict[str, Any] | None:
            seen = api.get(f"/v1/sandboxes/{sandbox_id}").json()
            return seen["awake"] if seen["awake"] else None

        why = eventually(lambda: (a := awake(busy["id"])) and a["reasons"] and a, what="a reason")
        # the subshell and its sleep
        assert why["idle"] is False and why["reasons"] == ["2 processes running"]
        assert why["idle_timeout_at"] is None

        def stopped() -> dict[str, Any] | None:
            seen = api.get(f"/v1/sandboxes/{idle['id']}").json()
            return seen if seen["status"] == "stopped" else None

        gone = eventually(stopped, timeout=30, what="the idle sandbox to be stopped")
        assert gone["end_reason"] == "idle for 5 s"
        still = api.get(f"/v1/sandboxes/{busy['id']}").json()
        assert still["status"] == "running" and still["awake"]["reasons"] == ["2 processes running"]
        api.delete(f"/v1/sandboxes/{busy['id']}")


def test_an_open_exec_stream_keeps_a_sandbox_awake(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver()
        cluster.start_shuttle("a", "--runtime", "namespace")
        with cluster.client() as api:
            sandbox = create(api, idle_timeout_s=3, on_expiry="pause", isolation="namespace")
            with socket_to(cluster, f"/v1/sandboxes/{sandbox['id']}/exec") as ws:
                start(ws, cmd=["cat"])  # waits on its stdin: no CPU, one process, one stream

                def reasons() -> list[str] | None:
                    awake = api.get(f"/v1/sandboxes/{sandbox['id']}").json()["awake"]
                    return awake["reasons"] if awake and awake["reasons"] else None

                assert eventually(reasons) == ["1 process running", "1 exec stream open"]
                ws.send(json.dumps({"eof": True}))
                assert json.loads(ws.recv())["exit"]["exit_code"] == 0

            def paused() -> dict[str, Any] | None:
                seen = api.get(f"/v1/sandboxes/{sandbox['id']}").json()
                return seen if seen["status"] == "paused" else None

            seen = eventually(paused, timeout=30, what="the idle sandbox to be paused")
            assert seen["desired"] == "paused" and seen["awake"] is None
    finally:
        cluster.stop()


def test_a_file_larger_than_a_request_body_streams_in_and_out(cluster: Cluster) -> None:
    data = os.urandom(24 * 1024 * 1024 + 5)  # past the 8 MiB body limit and the node's queue
    with cluster.client() as api:
        sandbox = create(api)
        content = f"/v1/sandboxes/{sandbox['id']}/files/content"
        written = api.put(content, params={"path": "big.bin"}, content=iter_chunks(data))
        assert written.status_code == 200, written.text
        assert written.json()["size"] == len(data)
        assert api.get(content, params={"path": "big.bin"}).content == data
        assert run(api, sandbox["id"], "sha256sum big.bin")["stdout"].split()[0] == (
            hashlib.sha256(data).hexdigest()
        )
        # Other requests keep their limit.
        too_big = api.post(f"/v1/sandboxes/{sandbox['id']}/exec", content=b"x" * (9 * 1024 * 1024))
        assert too_big.status_code == 413
        api.delete(f"/v1/sandboxes/{sandbox['id']}")

    with cluster.client() as api:
        small = create(api, resources={"disk_mib": 1})
        content = f"/v1/sandboxes/{small['id']}/files/content"
        over = api.put(content, params={"path": "f"}, content=iter_chunks(b"y" * (1024 * 1024 + 1)))
        assert over.status_code == 507, over.text
        assert over.json()["error"]["details"]["quota_mib"] == 1
        fits = api.put(content, params={"path": "g"}, content=b"z" * (512 * 1024))
        assert fits.status_code == 200, fits.text
        api.delete(f"/v1/sandboxes/{small['id']}")


def iter_chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def test_a_directory_is_watched_over_a_websocket(cluster: Cluster) -> None:
    with cluster.client() as api:
        sandbox = create(api)
        sid = sandbox["id"]
        run(api, sid, "mkdir -p project/src")
        watch = f"/v1/sandboxes/{sid}/files/watch?path=project&recursive=true"
        with socket_to(cluster, watch) as ws:
            assert json.loads(ws.recv()) == {"watching": "project"}  # in place from here
            api.put(
                f"/v1/sandboxes/{sid}/files/content",
                params={"path": "project/src/main.py"},
                content=b"print(1)\n",
            )
            run(api, sid, "rm project/src/main.py")
            seen: list[dict[str, Any]] = []
            wanted = {"type": "remove", "name": "src/main.py", "dir": False}
            while wanted not in seen:
                seen.append(json.loads(ws.recv()))
            assert {"type": "create", "name": "src/main.py", "dir": False} in seen
            assert {"type": "write", "name": "src/main.py", "dir": False} in seen
        # Its directory going ends the watch.
        with socket_to(cluster, f"/v1/sandboxes/{sid}/files/watch?path=project") as ws:
            assert json.loads(ws.recv()) == {"watching": "project"}
            run(api, sid, "rm -r project")
            last = {}
            while "end" not in last:
                last = json.loads(ws.recv())
        with socket_to(cluster, f"/v1/sandboxes/{sid}/files/watch?path=nowhere") as ws:
            refused = json.loads(ws.recv())
            assert refused["error"]["code"] == "not_found"
        # A path at its limit goes to the sandbox (whose file system finds it too long);
        # one past it is refused by the API before that.
        for length, errno in ((4096, "ENAMETOOLONG"), (4097, None)):
            with socket_to(cluster, f"/v1/sandboxes/{sid}/files/watch?path={'a' * length}") as ws:
                refused = json.loads(ws.recv())["error"]
                assert refused["code"] == "invalid_request"
                assert refused["details"].get("errno") == errno
        api.delete(f"/v1/sandboxes/{sid}")


def test_a_port_by_host_name(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_weaver(sandbox_domain="sandbox.test")
        cluster.start_shuttle("a")
        with cluster.client() as api:
            sandbox = create(api)
            sid = sandbox["id"]
            serve(cluster, sid, HTTP_SERVER, 8080)
            host = f"8080-{sid.removeprefix('sbx_')}.sandbox.test"
            # The server sees its own paths, from `/`, and no prefix.
            got = api.get("/app/page?x=1", headers={"host": host})
            assert got.status_code == 200, got.text
            seen = got.json()
            assert seen["path"] == "/app/page?x=1"
            assert "x-forwarded-prefix" not in seen["headers"]
            signed = api.post(f"/v1/sandboxes/{sid}/urls", json={"port": 8080, "path": "/s"})
            host_url = signed.json()["host_url"]
            assert host_url.startswith(f"http://{host}:")
            parts = urllib.parse.urlsplit(host_url)
            with httpx.Client(base_url=cluster.url) as anonymous:
                assert anonymous.get("/", headers={"host": host}).status_code == 401
                opened = anonymous.get(f"{parts.path}?{parts.query}", headers={"host": host})
                assert opened.status_code == 200 and opened.json()["path"] == "/s"
                assert "Path=/;" in opened.headers["set-cookie"]
                # Another sandbox's host name, or another port's, is not opened by it.
                other = f"8081-{sid.removeprefix('sbx_')}.sandbox.test"
                url = f"{parts.path}?{parts.query}"
                assert anonymous.get(url, headers={"host": other}).status_code == 403
            # Other hosts reach the API as before.
            assert api.get(f"/v1/sandboxes/{sid}").status_code == 200
            api.delete(f"/v1/sandboxes/{sid}")
    finally:
        cluster.stop()
