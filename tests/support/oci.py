"""Running real OCI containers in the tests: one `OciHarness` per runtime (crun, runc,
runsc), each probed once per session on this host.

The harness works under a private directory of /tmp that is traversable by others (0711),
not under pytest's 0700 tmp_path: in a user namespace, runsc's gofer reaches the work and
bundle directories as the namespace's unprivileged root. Its containers' cgroups go under a
parent of their own (`treadle/test-<random>`), removed at the end, so that sweeping them can
never touch anything else on the host.

TREADLE_TEST_RUNSC names a runsc outside PATH (e.g. a newer build with systrap and
--pass-fd) to run the gvisor tests with.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from treadle.shuttle.oci.bundle import (
    Bundle,
    Identity,
    Limits,
    new_container_id,
    prepare_bundle,
)
from treadle.shuttle.oci.images import ImageStore
from treadle.shuttle.oci.rootfs import Rootfs
from treadle.shuttle.oci.tools import (
    ContainerProcess,
    ContainerRun,
    OciTool,
    OomLog,
    ToolKind,
    find_tools,
    probe,
    remove_cgroups,
    run_container,
)

__all__ = ["KINDS", "OciHarness", "harness_for", "oci_base"]

KINDS = [kind.value for kind in ToolKind]


class OciHarness:
    def __init__(
        self, tool: OciTool, base: Path, rootfs: Rootfs, userns: bool, oom_log: OomLog
    ) -> None:
        self.tool = tool
        self.base = base
        self.rootfs = rootfs
        self.identity = Identity() if userns else Identity(userns=None)
        self.oom_log = oom_log
        self.cgroup_parent = f"treadle/test-{secrets.token_hex(4)}"
        self.bundles_dir = base / "bundles" / tool.name.replace(":", "-")

    def bundle(
        self,
        argv: Sequence[str],
        *,
        limits: Limits | None = None,
        env: dict[str, str] | None = None,
        args: dict[str, Any] | None = None,
        rootfs: Rootfs | None = None,
    ) -> Bundle:
        container_id = new_container_id("test", 1)
        workdir = self.base / "work" / container_id
        workdir.mkdir(parents=True)
        (workdir / "args.json").write_text(json.dumps(args or {}))
        return prepare_bundle(
            self.bundles_dir,
            container_id=container_id,
            argv=argv,
            env=env or {},
            rootfs=rootfs or self.rootfs,
            workdir=workdir,
            limits=limits or Limits(),
            identity=self.identity,
            traits=self.tool.traits,
            cgroup_parent=self.cgroup_parent,
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        timeout_s: float = 120.0,
        **options: Any,
    ) -> ContainerRun:
        bundle = self.bundle(argv, **options)
        try:
            return run_container(
                self.tool, bundle, stdin=stdin, timeout_s=timeout_s, oom_log=self.oom_log
            )
        finally:
            self.remove_workdir(bundle)

    def start(self, argv: Sequence[str], **options: Any) -> ContainerProcess:
        return ContainerProcess.start(self.tool, self.bundle(argv, **options))

    def remove_workdir(self, bundle: Bundle) -> None:
        shutil.rmtree(self.base / "work" / bundle.container_id, ignore_errors=True)

    def close(self) -> None:
        """Remove the harness's cgroups. A test that failed may have left a container in
        them: it is killed, so that the failure stays that test's and not the next one's."""
        errors = remove_cgroups(self.cgroup_parent)
        assert errors == [], errors


@pytest.fixture(scope="session")
def oci_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="treadle-oci-"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def harness_for(kind: str, base: Path) -> Iterator[OciHarness]:
    """The harness of `kind`, proven to run a container here: skipped when the tool is not
    installed (failed in CI, whose scripts/test installs it), failed when it is installed
    and cannot run one."""
    paths = {}
    if kind == ToolKind.RUNSC and os.environ.get("TREADLE_TEST_RUNSC"):
        paths[ToolKind.RUNSC] = os.environ["TREADLE_TEST_RUNSC"]
    candidates = [t for t in find_tools(base / "state", paths=paths) if t.kind == kind]
    if not candidates:
        message = f"{kind} is not installed (scripts/system-packages lists it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    rootfs = ImageStore(base / "cache").host_rootfs()
    failures = []
    for tool in candidates:
        result = probe(tool, rootfs, base)
        if result.ok:
            oom_log = OomLog()
            harness = OciHarness(tool, base, rootfs, result.userns, oom_log)
            yield harness
            harness.close()
            oom_log.close()
            return
        failures.append(f"{tool.name}: {result.detail}")
    pytest.fail(f"{kind} is installed but runs no container here: {'; '.join(failures)}")
