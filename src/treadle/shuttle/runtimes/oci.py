"""The `oci` tier (crun, else runc) and the `gvisor` tier (runsc): each attempt runs as a
container of an OCI runtime, on the process tier's machinery (`OciLauncher`).

The container's root is the function's image when it names one (pulled through the
`ImageStore` before the attempt is prepared, once per reference and node: pin a digest to
get a moved tag again), else the host's programs; read-only either way. Its work dir is a
directory of the attempt's under Shuttle's state, with a tmpfs of the function's `disk_mib`
mounted over it (`treadle.shuttle.mounts`), bound at /work; see `treadle.shuttle.oci.bundle`
for everything else the sandbox is.

The runtime process runs the container in its foreground and passes on the result pipe as
the container's fd 3. It is never the only thing to kill: the container's processes are in
a session of their own, so killing an attempt also asks the runtime to kill the container,
and once the runtime process is gone the container is deleted, which kills whatever is left.
The OOM count is read before `delete` (runc keeps the cgroup until then; the kernel log
tells for crun and runsc, which remove it at exit).

State (the tools' `--root`, bundles, the cached host rootfs and images) lives in a directory
per Shuttle process under the node's private state root (`treadle.shuttle.sandbox.state`:
/var/lib/treadle/oci for a root Shuttle), not under Shuttle's home: runtimes are made before
Shuttle has settled on its home, and a trial run must not create one. Cgroups go under
`treadle/<owner>.<pid>`, so that sweeping up after a dead Shuttle leaves live ones alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path

from treadle.domain.resources import Tier
from treadle.protocol.messages import AssignSpec, Usage
from treadle.shuttle import reaper
from treadle.shuttle.mounts import mount_tmpfs, mounts_under, unmount
from treadle.shuttle.oci.bundle import (
    CGROUP_PARENT,
    Bundle,
    BundleError,
    Identity,
    IdMap,
    Limits,
    assign_environment,
    new_container_id,
    prepare_bundle,
)
from treadle.shuttle.oci.fetch import ImageFetcher
from treadle.shuttle.oci.images import ImageStore
from treadle.shuttle.oci.rootfs import Rootfs
from treadle.shuttle.oci.tools import (
    OciTool,
    OomLog,
    ProbeResult,
    ToolKind,
    cgroup_dirs,
    find_tools,
    probe,
    remove_cgroups,
    runtime_error,
    sweep,
)
from treadle.shuttle.runtimes import bwrap
from treadle.shuttle.runtimes._spawn import unsupported_reason
from treadle.shuttle.runtimes.base import ExitStatus
from treadle.shuttle.runtimes.namespace import Unavailable, cgroup_owner
from treadle.shuttle.runtimes.process import (
    Attempt,
    Launch,
    ProcessRuntime,
    ReadOnlyBind,
    workdir_files,
)
from treadle.shuttle.sandbox import cleanup, exits
from treadle.shuttle.sandbox.cgroups import Group, GroupUsage
from treadle.shuttle.sandbox.ids import SANDBOX_GID, SANDBOX_UID, IdPool, IdRange, pool_for
from treadle.shuttle.sandbox.policy import AGENT_USER_ENV, ROOT_CAPABILITIES, WORK_DIR
from treadle.shuttle.sandbox.state import private_dir, state_root
from treadle.shuttle.settings import ShuttleSettings

__all__ = ["OciLauncher", "OciRuntime", "oci_runtimes"]

log = logging.getLogger(__name__)

_TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RUNTIME_LOG = "runtime.log"
_MIB = 1024 * 1024
# A trial run proves the host can run a tool; that holds for the life of the process, and
# every runtime made (one per home) would otherwise pay for it again.
_PROBES: dict[tuple[str, str, str | None, bool], ProbeResult] = {}
_PROBES_LOCK = threading.Lock()


def _search_path() -> str:
    # Shuttle's own PATH, as for bubblewrap: the operator decides which tools it may use.
    return os.environ.get("PATH") or os.defpath


def _state_base() -> Path:
    return private_dir(state_root() / "oci")


class OciLauncher:
    """Spawns an OCI runtime's `run` for each attempt (see the module's docstring)."""

    def __init__(
        self,
        tool: OciTool,
        *,
        rootfs: Rootfs,
        identity: Identity,
        bundles_dir: Path,
        cgroup_parent: str,
        pids_max: int,
        oom_log: OomLog,
        work_root: Path,
        images: ImageStore | None = None,
        allowed_registries: Collection[str] | None = None,
        ids: IdPool | None = None,
    ) -> None:
        self.tool = tool
        self._ids = ids
        self.work_root = work_root
        self._rootfs = rootfs
        self.images = ImageFetcher(images, allowed_registries)
        # gVisor counts the sandbox's processes itself and enforces this rlimit as the limit
        # (its cgroup holds the sentry's threads, not the program's processes). Elsewhere the
        # rlimit is a backstop above the cgroup's limit: checked first, at the same number it
        # would deny the fork without the cgroup telling why.
        self._nproc = pids_max if tool.kind is ToolKind.RUNSC else 2 * pids_max
        self._identity = identity
        self.bundles_dir = bundles_dir
        self.cgroup_parent = cgroup_parent
        self._pids_max = pids_max
        self._oom_log = oom_log

    @property
    def tier(self) -> Tier:
        return self.tool.tier

    async def fetch_image(self, spec: AssignSpec) -> None:
        if spec.image is not None:
            await self.images.fetch(spec.image)

    def prepare(
        self,
        spec: AssignSpec,
        workdir: Path,
        *,
        binds: Sequence[ReadOnlyBind] = (),
        users: bool = False,
    ) -> Attempt:
        """See `Launcher.prepare`; `users` as `NamespaceLauncher.prepare`'s (granted where the
        workload has a user namespace over host ids of its own)."""
        container_id = new_container_id(spec.id, spec.attempt)
        # Not the work dir Shuttle offers: this one is under the tier's own state, which the
        # sweep after a crash covers (it holds a mount), and whose directories runsc's gofer,
        # running as the sandbox's unprivileged user, may pass through.
        workdir = self.work_root / container_id
        rootfs = self._rootfs
        if spec.image is not None:
            rootfs = self.images.fetched(spec.image)
        identity, ids = self._identity, None
        if identity.userns is not None and self._ids is not None:
            ids = self._ids.claim()
            identity = Identity(SANDBOX_UID, SANDBOX_GID, IdMap(ids.start, ids.size))
        users = users and ids is not None
        if users:
            identity = replace(identity, capabilities=ROOT_CAPABILITIES)
        try:
            _remove_workdir(workdir)  # left over by a crash, or a retried assignment
            files = workdir_files(spec)
            env = assign_environment(spec)
            if users:
                env[AGENT_USER_ENV] = f"{SANDBOX_UID}:{SANDBOX_GID}"
            if spec.image is None:
                # The host's programs are known here; an image's are found by the runtime,
                # which reports a missing one as a failed start.
                bwrap.resolve_in_sandbox(
                    spec.argv[0],
                    env.get("PATH", _TOOL_PATH),
                    {name: mode for name, _, mode in files},
                    {bind.target: bind.source for bind in binds},
                )
            workdir.mkdir(mode=0o700, parents=True)
            needed = sum(len(data) for _, data, _ in files) + _MIB
            mount_tmpfs(workdir, max(spec.resources.disk_mib * _MIB, needed))
            for name, data, mode in files:
                _write(workdir / name, data, mode)
            try:
                bundle = prepare_bundle(
                    self.bundles_dir,
                    container_id=container_id,
                    argv=spec.argv,
                    env=env,
                    rootfs=rootfs,
                    workdir=workdir,
                    limits=Limits.from_resources(
                        spec.resources, pids=self._pids_max, nproc=self._nproc
                    ),
                    identity=identity,
                    traits=self.tool.traits,
                    cgroup_parent=self.cgroup_parent,
                    binds=[(bind.source, bind.target) for bind in binds],
                    home=spec.workdir or WORK_DIR,
                    args_file=not spec.no_args,
                )
            except BundleError as exc:
                raise ValueError(str(exc)) from exc
        except BaseException:
            _remove_workdir(workdir)
            self._give_back(ids)
            raise
        argv = self.tool.run_argv(bundle, log=bundle.path / _RUNTIME_LOG)
        try:
            result = bundle.open_result() if bundle.result_fifo is not None else None
        except BaseException:
            bundle.remove()
            _remove_workdir(workdir)
            self._give_back(ids)
            raise
        launch = Launch(
            program=argv[0], argv=argv, env={"PATH": _TOOL_PATH}, cwd=Path("/"), result=result
        )
        return _OciAttempt(
            launch, self.tool, bundle, workdir, self._oom_log, lambda: self._give_back(ids)
        )

    def _give_back(self, ids: IdRange | None) -> None:
        if ids is not None and self._ids is not None:
            self._ids.give_back(ids)


class _OciAttempt:
    """One container: killed through its runtime, deleted with its cgroup and bundle once
    the runtime process has exited."""

    def __init__(
        self,
        launch: Launch,
        tool: OciTool,
        bundle: Bundle,
        workdir: Path,
        oom_log: OomLog,
        released: Callable[[], None],
    ) -> None:
        self.launch = launch
        self._released = released
        self._tool = tool
        self._bundle = bundle
        self._workdir = workdir
        self._oom_log = oom_log
        self._oom_kills = 0
        self._pids_denied = False
        self._counters: GroupUsage | None = None  # its cgroup's, read as it ended
        self._runtime_error: str | None = None

    async def spawned(self, pid: int) -> None:
        pass

    async def pause(self) -> None:
        await asyncio.to_thread(self._tool.pause, self._bundle.container_id)

    async def resume(self) -> None:
        await asyncio.to_thread(self._tool.resume, self._bundle.container_id)

    def kill(self) -> None:
        # Off the caller's thread: the runtime's `kill` is a process of its own to wait for.
        threading.Thread(
            target=self._tool.kill,
            args=(self._bundle.container_id,),
            name="treadle-oci-kill",
            daemon=True,
        ).start()

    def counters(self) -> GroupUsage | None:
        """Its container's cgroup counters now."""
        return Group.at(self._bundle.cgroups_path).usage()

    def exited(self, settled: Callable[[], None]) -> None:
        # What tells how the container ended is a few small reads, done now; deleting it
        # (a process of the runtime's own), its cgroups, bundle and work dir follows the
        # exit report instead of delaying it.
        path = self._bundle.cgroups_path
        usage = Group.at(path).usage()
        self._oom_kills = max(usage.oom_kills, self._oom_log.take(path))
        self._pids_denied = usage.pids_denied > 0
        self._counters = usage
        self._runtime_error = runtime_error(self._tool, self._bundle.path / _RUNTIME_LOG)
        settled()

    def _release(self) -> None:
        """Delete the container and everything it held."""
        self._tool.delete(self._bundle.container_id)
        errors = remove_cgroups(self._bundle.cgroups_path)
        self._bundle.remove()
        _remove_workdir(self._workdir)
        if errors:
            # Something of it may still run as its ids: they stay out of the pool for the
            # life of this Shuttle rather than go to another tenant's workload.
            log.warning("cannot remove the cgroup of %s: %s", self._bundle.container_id, errors)
            return
        self._released()  # no process of it is left to hold its ids

    def finish(self, status: ExitStatus) -> ExitStatus:
        cleanup.defer(self._release, self._bundle.container_id)
        if self._runtime_error is not None and status.reason is None and status.exit_code:
            # The container never ran the program: the runtime said why (also on stderr).
            return ExitStatus(None, exits.SPAWN_FAILED, status.result, status.usage)
        return _classify(status, self._oom_kills, self._pids_denied, self._counters)

    def abandon(self) -> None:
        self._bundle.remove()
        _remove_workdir(self._workdir)
        self._released()


def _holds_anything(directory: Path) -> bool:
    """Whether `directory` holds an entry; one that cannot be read, as far as is known."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def _remove_workdir(workdir: Path) -> None:
    try:
        for point in mounts_under(workdir):
            unmount(point)
    except OSError as exc:
        log.warning("%s", exc)
    shutil.rmtree(workdir, ignore_errors=True)


def _classify(
    status: ExitStatus, oom_kills: int, pids_denied: bool, counters: GroupUsage | None
) -> ExitStatus:
    peak = None if counters is None or counters.peak_bytes is None else counters.peak_bytes
    code, reason = exits.classify(
        status.exit_code, status.reason, oom_killed=bool(oom_kills), pids_denied=pids_denied
    )
    return ExitStatus(
        exit_code=code,
        reason=reason,
        result=status.result,
        # The runtime's own usage is not the program's: only the cgroup's peak is.
        usage=Usage(
            wall_ms=status.usage.wall_ms,
            cpu_ms=status.usage.cpu_ms,
            max_rss_kib=None if peak is None else peak // 1024,
        ),
        counters=counters,
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class OciRuntime(ProcessRuntime):
    """The `oci` or `gvisor` tier, running containers with `tool` (which a trial run has
    shown to work: see `oci_runtimes`)."""

    def __init__(
        self,
        tool: OciTool,
        *,
        rootfs: Rootfs,
        identity: Identity,
        state_dir: Path,
        cgroup_parent: str,
        pids_max: int,
        oom_log: OomLog,
        images: ImageStore | None = None,
        allowed_registries: Collection[str] | None = None,
        ids: IdPool | None = None,
        drain_timeout_s: float = 1.0,
    ) -> None:
        self._oci = OciLauncher(
            tool,
            rootfs=rootfs,
            identity=identity,
            bundles_dir=state_dir / "bundles",
            cgroup_parent=cgroup_parent,
            pids_max=pids_max,
            oom_log=oom_log,
            work_root=state_dir / "work",
            images=images,
            allowed_registries=allowed_registries,
            ids=ids,
        )
        super().__init__(self._oci, drain_timeout_s=drain_timeout_s)

    @property
    def tool(self) -> OciTool:
        return self._oci.tool

    @property
    def bundles_dir(self) -> Path:
        """Each container's bundle, in a directory named after the container."""
        return self._oci.bundles_dir

    @property
    def work_root(self) -> Path:
        """Each container's work dir (its /work), in a directory named after the container."""
        return self._oci.work_root

    @property
    def limits(self) -> str:
        """How resource limits are enforced, as `NamespaceRuntime.limits` says it."""
        return f"cgroup ({self._oci.tool.name})"


def image_store(settings: ShuttleSettings) -> ImageStore:
    """The node's cache of unpacked images, shared by every tier that runs them."""
    return ImageStore(
        private_dir(_state_base() / "images"), insecure_registries=settings.insecure_registries
    )


def oci_runtimes(settings: ShuttleSettings) -> dict[Tier, OciRuntime]:
    """The `oci` and `gvisor` tiers, those of them whose tool passes a trial run here. Sweeps
    what containers of dead Shuttles left behind first."""
    reason = unsupported_reason()
    if reason is not None:
        raise Unavailable(reason)
    owner = cgroup_owner(settings.home)
    # Each checked to be this user's alone; the sandbox's user reaches its work dir and a
    # result FIFO through them (mode 0711).
    base = _state_base()
    owned = private_dir(base / "shuttles")
    me = f"{owner}.{os.getpid()}"
    _sweep_dead(owned)
    state_dir = private_dir(owned / me)
    images = image_store(settings)
    rootfs = images.resolve(None)
    cgroup_parent = f"{CGROUP_PARENT}/{me}"
    oom_log = OomLog(cgroup_parent)
    runtimes: dict[Tier, OciRuntime] = {}
    for tool in find_tools(state_dir, search_path=_search_path()):
        if tool.tier in runtimes:
            continue
        if tool.kind is not ToolKind.RUNSC and settings.oci_tool not in (None, tool.kind.value):
            continue
        result = _probe(tool, rootfs, base)
        if not result.ok:
            log.warning("%s tier: %s does not work here: %s", tool.tier, tool.name, result.detail)
            continue
        runtimes[tool.tier] = OciRuntime(
            tool,
            rootfs=rootfs,
            identity=Identity() if result.userns else _shared_identity(tool),
            state_dir=state_dir,
            cgroup_parent=cgroup_parent,
            pids_max=settings.pids_max,
            oom_log=oom_log,
            images=images,
            allowed_registries=settings.allowed_registries,
            ids=pool_for(settings.sandbox_ids_base),
        )
        log.info("%s tier available through %s", tool.tier, tool.name)
    return runtimes


def _shared_identity(tool: OciTool) -> Identity:
    log.warning(
        "%s tier: no user namespace works here: every workload runs as host uid %d, shared "
        "(per-user limits and signals between workloads are not kept apart)",
        tool.tier,
        Identity(userns=None).host_uid,
    )
    return Identity(userns=None)


def _probe(tool: OciTool, rootfs: Rootfs, base: Path) -> ProbeResult:
    key = (str(tool.kind), tool.path, tool.platform, tool.passes_fds)
    with _PROBES_LOCK:
        cached = _PROBES.get(key)
        if cached is not None:
            return cached
        work = base / "probe"
        work.mkdir(mode=0o711, parents=True, exist_ok=True)
        result = probe(tool, rootfs, work)
        _PROBES[key] = result
        return result


def sweep_dead_shuttles() -> None:
    """What containers of dead Shuttles left behind, removed (as `oci_runtimes` does first),
    for a Shuttle that offers neither oci tier: a container can outlive its Shuttle and go
    on running its workload."""
    if unsupported_reason() is None:
        _sweep_dead(private_dir(_state_base() / "shuttles"))


def _sweep_dead(owned: Path) -> None:
    """Remove what the containers of gone Shuttles left behind, whatever their home: a dead
    process's containers are nobody's."""
    if not owned.is_dir():
        return
    for entry in owned.iterdir():
        _, _, pid = entry.name.partition(".")
        if not pid.isdigit() or reaper.alive(int(pid)):
            continue
        try:
            _sweep_entry(entry)
        except OSError as exc:
            # Shuttles starting together sweep the same leftovers: what another removed
            # first is gone, which is the point; nothing here may cost this one its tiers.
            log.info("sweeping %s: %s", entry, exc)


def _sweep_entry(entry: Path) -> None:
    # Finding the tools runs them, and asking each for its containers runs it again: only
    # the tools whose state directory holds anything (a container) are asked. A Shuttle's
    # trial runs leave each tool's directory, empty.
    kept = {kind for kind in ToolKind if _holds_anything(entry / kind.value)}
    tools = find_tools(entry, search_path=_search_path()) if kept else []
    report = sweep(
        [tool for tool in tools if tool.kind in kept],
        bundles_dir=entry / "bundles",
        cgroup_parent=f"{CGROUP_PARENT}/{entry.name}",
    )
    if report.containers or report.cgroups:
        log.warning(
            "removed containers %s and cgroups %s left by a previous Shuttle",
            report.containers,
            report.cgroups,
        )
    for error in report.errors:
        log.warning("sweeping up after a previous Shuttle: %s", error)
    for parent in cgroup_dirs(f"{CGROUP_PARENT}/{entry.name}"):
        with contextlib.suppress(OSError):
            parent.rmdir()
    _remove_workdir(entry)
