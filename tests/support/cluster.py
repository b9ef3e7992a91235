"""Real Weaver and Shuttle processes on loopback, for integration and end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def eventually(check: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.02)


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.args, self.log, self.env = args, log, env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is not None:
            self._note(f"had already exited with {self.popen.returncode} when stopped")
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            # Its stacks, for the log (Shuttle's stall watchdog enables this), then its end.
            self._note(f"did not stop within {timeout} s of signal {sig}; its stacks follow")
            self.popen.send_signal(signal.SIGABRT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def _note(self, line: str) -> None:
        with self.log.open("a") as handle:
            handle.write(f"[test harness] pid {self.pid} {line}\n")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """One Weaver with any number of Shuttles, each a separate process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "weaver"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.weaver: Proc | None = None
        self.shuttles: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TREADLE_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.ca: Path | None = None  # with `use_tls`, the certificate clients trust

    def use_tls(self, *names: str) -> Path:
        """Serve HTTPS with a self-signed certificate for 127.0.0.1 and `names` (e.g.
        `*.sandbox.test`): Weaver's URL turns https, and its clients, Shuttles included,
        trust that certificate and no other. Call before `start_weaver`."""
        cert, key = self.root / "tls.pem", self.root / "tls.key"
        alt = ",".join(["IP:127.0.0.1", *(f"DNS:{name}" for name in names)])
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=treadle-test",
                "-addext",
                f"subjectAltName={alt}",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        self.ca = cert
        self.url = f"https://127.0.0.1:{self.port}"
        self.env["SSL_CERT_FILE"] = str(cert)
        self.env["TREADLE_TLS_CERT_FILE"] = str(cert)
        self.env["TREADLE_TLS_KEY_FILE"] = str(key)
        return cert

    # processes

    def start_weaver(self, *, process_tier: bool = True, **settings: str) -> Proc:
        """Start Weaver; `settings` become TREADLE_* variables (e.g. node_down_after_s="1").

        With `process_tier`, as an operator would for trusted work: functions that name no
        tier may run in the process tier, and the admin's tenant is allowed it through the
        admin API. These tests' programs read and write the test's own files."""
        if process_tier:
            settings.setdefault("default_min_isolation", "process")
        env = dict(self.env, **{f"TREADLE_{k.upper()}": v for k, v in settings.items()})
        self.weaver = Proc(
            [
                sys.executable,
                "-m",
                "treadle",
                "weaver",
                "--home",
                str(self.home),
                "--port",
                str(self.port),
                "--log-level",
                "info",  # WebSocket open and close lines: what a failed test needs
            ],
            self.root / "weaver.log",
            env,
        ).start()
        eventually(self._healthy, what=f"weaver on {self.url}\n{self.weaver.output()}")
        if process_tier:
            self.allow_process_tier("default")
        return self.weaver

    def _healthy(self) -> bool:
        assert self.weaver is not None
        if not self.weaver.alive():
            raise AssertionError(f"weaver exited:\n{self.weaver.output()}")
        try:
            healthz = httpx.get(f"{self.url}/healthz", timeout=1, verify=self.verify)
            return healthz.status_code == 200
        except httpx.HTTPError:
            return False

    def start_shuttle(
        self, name: str | None = None, *extra: str, wait: bool = True, via: str | None = None
    ) -> Proc:
        """Start a Shuttle; `via` is another address for Weaver (a proxy). It offers only the
        process tier unless `extra` names others with --runtime: these tests' programs read
        and write the test's own files."""
        name = name or f"node{len(self.shuttles)}"
        tiers = () if "--runtime" in extra else ("--runtime", "process")
        env = dict(self.env, TREADLE_SHUTTLE_TOKEN=self.join_token)
        proc = Proc(
            [
                sys.executable,
                "-m",
                "treadle",
                "shuttle",
                "--weaver",
                via or self.url,
                "--home",
                str(self.root / name),
                "--name",
                name,
                "--allow-process-runtime",
                *tiers,
                *extra,
            ],
            self.root / f"{name}.log",
            env,
        ).start()
        self.shuttles.append(proc)
        if wait:
            eventually(
                lambda: self.node_named(name, connected=True),
                what=f"shuttle {name} to join\n{proc.output()}",
            )
        return proc

    def stop(self) -> None:
        for proc in self.shuttles:
            proc.stop()
        if self.weaver is not None:
            self.weaver.stop()

    # credentials and API

    @property
    def admin_key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    @property
    def join_token(self) -> str:
        return (self.home / "join.token").read_text().strip()

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return True if self.ca is None else ssl.create_default_context(cafile=str(self.ca))

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            timeout=60,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
            verify=self.verify,
        )

    def allow_process_tier(self, tenant: str, allowed: bool = True) -> dict[str, Any]:
        """Allow (or deny) the tenant named or identified `tenant` the process tier."""
        with self.client() as api:
            items = api.get("/v1/tenants").json()["items"]
            found = next(t for t in items if tenant in (t["id"], t["name"]))
            answer = api.patch(f"/v1/tenants/{found['id']}", json={"allow_process_tier": allowed})
            assert answer.status_code == 200, answer.text
            return dict(answer.json())

    def node_named(self, name: str, connected: bool | None = None) -> dict[str, Any] | None:
        with self.client() as api:
            for item in api.get("/v1/nodes").json()["items"]:
                if item["name"] == name and (connected is None or item["connected"] == connected):
                    return dict(item)
        return None
