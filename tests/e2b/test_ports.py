"""`sbx.get_host(port)` through Weaver's host routing, as the stock SDK builds it: a server
started in a sandbox with `commands.run` is reached at `{port}-{id}.{domain}`, with no
credential for a sandbox with public traffic (E2B's default) and only with its traffic
token for one without."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from e2b.programs import SDK
from integration.test_sandbox_work import WS_SERVER
from support.cluster import Cluster

pytestmark = pytest.mark.integration

DOMAIN = "sb.test"
# A web server left running by a shell that ends once it listens.
_SERVE_IN_BACKGROUND = (
    "echo hi > index.html; python3 -m http.server 8000 >/dev/null 2>&1 & "
    "until python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8000))\" "
    "2>/dev/null; do sleep 0.05; done"
)


@pytest.fixture(scope="module")
def domain_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("e2b-ports"))
    try:
        cluster.start_weaver(process_tier=False, sandbox_domain=DOMAIN)
        cluster.start_shuttle("ns0", "--runtime", "namespace")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("version", ["2.63", "2.50"])
def test_get_host_reaches_a_server_in_the_sandbox(
    domain_cluster: Cluster, version: str, tmp_path: Path
) -> None:
    sdk = SDK(domain_cluster, version, "sync")
    if not sdk.python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"e2b {version} is not installed; scripts/test installs it")
        pytest.skip(f"e2b {version} is not installed (scripts/e2b-sdks installs it)")
    (tmp_path / "ws.py").write_text(WS_SERVER)
    seen = sdk.run(
        f"""
        sbx = await w(S.create(allow_internet_access=False, timeout=120))
        await w(sbx.files.write("index.html", "hello from the sandbox"))
        await w(sbx.files.write("ws.py", {WS_SERVER!r}))
        await w(sbx.commands.run("python3 -m http.server 8000", background=True, timeout=0))
        await w(sbx.commands.run("python3 ws.py 8001", background=True, timeout=0))
        # Until both listen: a poll inside the sandbox, as a user's own script would.
        await w(sbx.commands.run(
            "for p in 8000 8001; do until python3 -c \\"import socket; "
            "socket.create_connection(('127.0.0.1', $p))\\" 2>/dev/null; do sleep 0.05; done;"
            " done", timeout=60))
        out(http=sbx.get_host(8000), ws=sbx.get_host(8001), id=sbx.sandbox_id)
        """
    )
    port = domain_cluster.url.rsplit(":", 1)[1]
    assert seen["http"] == f"8000-{seen['id']}.{DOMAIN}:{port}"
    with httpx.Client(base_url=domain_cluster.url, timeout=30) as anyone:
        page = anyone.get("/index.html", headers={"host": seen["http"]})
        assert (page.status_code, page.text) == (200, "hello from the sandbox")
    # A WebSocket server, by its host name, with no credential either.
    # (A socket to Weaver stands for the wildcard DNS name a deployment has.)
    weaver = socket.create_connection(("127.0.0.1", int(port)))
    with connect(f"ws://{seen['ws']}/echo", sock=weaver) as ws:
        ws.send("ping")
        assert ws.recv(timeout=30) == "PING"
    with domain_cluster.client() as api:
        api.delete(f"/v1/sandboxes/sbx_{seen['id']}")


def test_ports_without_public_traffic_need_the_traffic_token(domain_cluster: Cluster) -> None:
    key = {"X-API-Key": domain_cluster.admin_key}
    with httpx.Client(base_url=domain_cluster.url, timeout=60) as client:
        created = client.post(
            "/v2/sandboxes",
            json={
                "templateID": "base",
                "allow_internet_access": False,
                "network": {"allowPublicTraffic": False},
            },
            headers=key,
        )
        assert created.status_code == 201, created.text
        body = created.json()
        sid, token = body["sandboxID"], body["trafficAccessToken"]
        with domain_cluster.client() as api:
            started = api.post(
                f"/v1/sandboxes/sbx_{sid}/exec",
                json={"cmd": _SERVE_IN_BACKGROUND, "timeout_s": 60},
                timeout=90,
            )
            assert started.status_code == 200 and started.json()["exit_code"] == 0, started.text
        host = f"8000-{sid}.{DOMAIN}"
        refused = client.get("/", headers={"host": host})
        assert refused.status_code == 401
        wrong = client.get("/", headers={"host": host, "e2b-traffic-access-token": "nope"})
        assert wrong.status_code == 403
        opened = client.get(
            "/index.html", headers={"host": host, "e2b-traffic-access-token": token}
        )
        assert (opened.status_code, opened.text) == (200, "hi\n")
        rules = client.post(
            "/v2/sandboxes",
            json={"templateID": "base", "network": {"allowOut": ["1.1.1.1"]}},
            headers=key,
        )
        assert rules.status_code == 400 and "network rules" in rules.json()["message"]
        bad = client.post(
            "/v2/sandboxes",
            json={"templateID": "base", "network": {"allowPublicTraffic": "yes"}},
            headers=key,
        )
        assert bad.status_code == 400, bad.text
        client.delete(f"/sandboxes/{sid}", headers=key)


def test_envd_by_host_name_over_tls(tmp_path: Path) -> None:
    """Without E2B_SANDBOX_URL the SDK calls `https://49983-{id}.{domain}`: with a wildcard
    certificate configured, Weaver serves it, as that sandbox's envd."""
    cluster = Cluster(tmp_path)
    try:
        ca = cluster.use_tls(f"*.{DOMAIN}")
        cluster.start_weaver(process_tier=False, sandbox_domain=DOMAIN)
        cluster.start_shuttle("ns0", "--runtime", "namespace")  # it dials wss://, trusting ca
        key = {"X-API-Key": cluster.admin_key}
        trusted = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=cluster.url, timeout=60, verify=trusted) as client:
            created = client.post(
                "/v2/sandboxes",
                json={"templateID": "base", "allow_internet_access": False},
                headers=key,
            )
            assert created.status_code == 201, created.text
            body = created.json()
            port = cluster.url.rsplit(":", 1)[1]
            assert body["domain"] == f"{DOMAIN}:{port}"
            envd = {
                "host": f"49983-{body['sandboxID']}.{body['domain']}",
                "x-access-token": body["envdAccessToken"],
            }
            start = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "pwd"]}}).encode()
            ran = client.post(
                "/process.Process/Start",
                content=struct.pack(">BI", 0, len(start)) + start,
                headers={**envd, "content-type": "application/connect+json"},
            )
            assert ran.status_code == 200, ran.text
            assert base64.b64encode(b"/home/user\n") in ran.content
            health = client.get("/health", headers=envd)
            assert health.status_code == 204, health.text
            # The same host name without the sandbox's token opens nothing.
            bare = {"host": envd["host"], "content-type": "application/json"}
            refused = client.post("/process.Process/List", content=b"{}", headers=bare)
            assert refused.status_code == 401
        # Plain HTTP to the HTTPS port is not served.
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=5) as plain:
            plain.get(cluster.url.replace("https", "http", 1) + "/healthz").raise_for_status()
    finally:
        cluster.stop()
