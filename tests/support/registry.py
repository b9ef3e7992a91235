"""A private container registry on loopback for the tests: Debian's `docker-registry`
(distribution 2.x) with its storage in a temporary directory, plus a tiny busybox image built
on the spot with umoci and pushed with skopeo. No network beyond loopback.

`registry` is a session fixture; import it into the test module that uses it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cluster import free_port

__all__ = ["Registry", "build_busybox_layout", "registry", "registry_binary", "require"]

BUSYBOX = "/bin/busybox"


def require(*programs: str) -> None:
    """Skip unless every program is installed; in CI (whose scripts/test installs them) fail
    instead."""
    missing = [p for p in programs if shutil.which(p) is None and not Path(p).is_file()]
    if missing:
        message = f"{', '.join(missing)} not installed (scripts/system-packages lists them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def registry_binary() -> str | None:
    return shutil.which("docker-registry")


class Registry:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="treadle-registry-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = self.root / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Registry:
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            f"http:\n  addr: {self.host}\n"
        )
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace"))
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def push(self, layout: Path, tag: str, repository: str) -> str:
        """Push `layout:tag` as `repository:tag`; the reference to pull it by."""
        reference = f"{self.host}/{repository}:{tag}"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:{tag}",
                f"docker://{reference}",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return reference

    def blob_downloads(self, repository: str) -> int:
        """Blob downloads (GETs) of `repository` so far, from the access log."""
        pattern = re.compile(rf'"GET /v2/{re.escape(repository)}/blobs/sha256:[0-9a-f]+ ')
        return len(pattern.findall(self.log.read_text(errors="replace")))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)


def build_busybox_layout(layout: Path, tag: str) -> Path:
    """An OCI image layout at `layout` holding one image, `tag`: a static busybox and a
    link for each of its applets under /bin (about 1 MB)."""
    rootfs = Path(tempfile.mkdtemp(prefix="busybox-rootfs-"))
    try:
        bin_dir = rootfs / "bin"
        bin_dir.mkdir()
        shutil.copy2(BUSYBOX, bin_dir / "busybox")
        applets = subprocess.run(
            [BUSYBOX, "--list"], check=True, capture_output=True, text=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (bin_dir / applet).symlink_to("busybox")
        if not layout.exists():
            _umoci("init", "--layout", str(layout))
        _umoci("new", "--image", f"{layout}:{tag}")
        _umoci("insert", "--image", f"{layout}:{tag}", str(rootfs), "/")
        _umoci("config", "--image", f"{layout}:{tag}", "--config.env", "PATH=/bin")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return layout


def push_busybox(registry: Registry, directory: Path, repository: str, tag: str = "v1") -> str:
    """The busybox image (`build_busybox_layout`), built under `directory` and pushed to
    `registry` as `repository:tag`: its reference."""
    require("umoci", "/bin/busybox")
    layout = build_busybox_layout(directory / "layout", tag)
    return registry.push(layout, tag, repository)


def _umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A registry on loopback, started once; required in CI like PostgreSQL."""
    require("docker-registry", "skopeo")
    binary = registry_binary()
    assert binary is not None
    server = Registry(binary).start()
    yield server
    server.stop()
