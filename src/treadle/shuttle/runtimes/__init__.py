"""Isolation runtimes, one per tier (DESIGN §4), behind the interface in `base`."""

from __future__ import annotations

import logging

from treadle.domain.resources import Tier
from treadle.shuttle.runtimes._spawn import unsupported_reason
from treadle.shuttle.runtimes.base import ExitStatus, Runtime, RuntimeHandle, SpawnFailed, Stream
from treadle.shuttle.runtimes.namespace import NamespaceRuntime, Unavailable
from treadle.shuttle.runtimes.oci import OciRuntime, oci_runtimes, sweep_dead_shuttles
from treadle.shuttle.runtimes.process import ProcessRuntime
from treadle.shuttle.settings import ShuttleSettings

__all__ = [
    "ExitStatus",
    "NamespaceRuntime",
    "OciRuntime",
    "ProcessRuntime",
    "Runtime",
    "RuntimeHandle",
    "SpawnFailed",
    "Stream",
    "available_runtimes",
    "gives_network",
    "sweep_after_dead_shuttles",
]

log = logging.getLogger(__name__)


def gives_network(runtime: Runtime) -> bool:
    """Whether executions in `runtime` get network when their function asks: only where
    the tier can give it without exposing the host (the namespace tier, through slirp4netns,
    and the microvm tier, whose VMM's jail gets the same) and the operator allowed it."""
    from treadle.shuttle.microvm.runtime import MicrovmRuntime

    return isinstance(runtime, (NamespaceRuntime, MicrovmRuntime)) and runtime.gives_network


def available_runtimes(settings: ShuttleSettings) -> dict[Tier, Runtime]:
    """The runtimes this host can run and the operator allows (`settings.runtimes`, when it
    names some: only those are tried), weakest tier first. Blocking: trial runs of each tier
    and, with the oci tiers, a sweep of what dead Shuttles' containers left behind (without
    them, `sweep_after_dead_shuttles` does that)."""
    wanted = settings.runtimes

    def wants(*tiers: Tier) -> bool:
        return wanted is None or any(tier in wanted for tier in tiers)

    runtimes: dict[Tier, Runtime] = {}
    if settings.allow_process_runtime and wants(Tier.PROCESS):
        reason = unsupported_reason()
        if reason is None:
            runtimes[Tier.PROCESS] = ProcessRuntime()
        else:
            log.warning("process runtime unavailable: %s", reason)
    # The microvm tier jails QEMU with the namespace tier's launcher.
    wants_microvm = settings.microvm and wants(Tier.MICROVM)
    namespace = _namespace_runtime(settings) if wants(Tier.NAMESPACE) or wants_microvm else None
    if namespace is not None and wants(Tier.NAMESPACE):
        runtimes[Tier.NAMESPACE] = namespace
    if _tries_oci(settings):
        try:
            runtimes.update(oci_runtimes(settings))
        except (Unavailable, OSError) as exc:
            log.warning("oci and gvisor runtimes unavailable: %s", exc)
    if wants_microvm:
        microvm = _microvm_runtime(namespace, settings)
        if microvm is not None:
            runtimes[Tier.MICROVM] = microvm
    return runtimes


def _microvm_runtime(jail: NamespaceRuntime | None, settings: ShuttleSettings) -> Runtime | None:
    """The microvm tier, where QEMU, the guest image's kernel package and the namespace tier
    (QEMU's jail) are all here; KVM where a guest boots under it, else software emulation.
    Functions' images come from the node's image store, as the oci tiers' do."""
    from treadle.shuttle.microvm.runtime import available
    from treadle.shuttle.oci.fetch import ImageFetcher
    from treadle.shuttle.runtimes.oci import image_store

    if jail is None:
        log.warning("microvm runtime unavailable: it needs the namespace tier to jail QEMU")
        return None
    try:
        images: ImageFetcher | None = ImageFetcher(
            image_store(settings), settings.allowed_registries
        )
    except OSError as exc:
        log.warning("microvm runtime: no image store (%s): it runs no images", exc)
        images = None
    # Scratch disks on the disk the node advertises (its home's), made when first needed.
    scratch = settings.home / "microvm-scratch"
    runtime, reason = available(jail.launcher, images, scratch)  # type: ignore[arg-type]
    if runtime is None:
        log.warning("microvm runtime unavailable: %s", reason)
    else:
        log.info("microvm runtime available: %s", reason)
    return runtime


def _namespace_runtime(settings: ShuttleSettings) -> NamespaceRuntime | None:
    """The namespace tier, if a trial run in a sandbox works here (a bwrap binary alone
    proves nothing: user namespaces may be disabled, or seccomp missing)."""
    try:
        runtime = NamespaceRuntime(settings)
    except Unavailable as exc:
        log.info("namespace runtime unavailable: %s", exc)
        return None
    reason = runtime.probe()
    if reason is not None:
        log.warning("namespace runtime unavailable: %s", reason)
        return None
    log.info("namespace runtime available; limits through %s", runtime.limits)
    return runtime


def sweep_after_dead_shuttles(settings: ShuttleSettings) -> None:
    """For a Shuttle that offers neither oci tier, and so never tried them
    (`available_runtimes`): remove what dead Shuttles' containers left behind, which can
    go on running their workloads. Blocking, and it may take long (each of the tools'
    commands may take up to 30 s), which is why this Shuttle does it in the background,
    not before it connects: it starts no container that the sweep could touch."""
    if _tries_oci(settings):
        return
    try:
        sweep_dead_shuttles()
    except OSError as exc:
        log.warning("sweeping up after dead Shuttles: %s", exc)


def _tries_oci(settings: ShuttleSettings) -> bool:
    """Whether `available_runtimes` tries the oci tiers, and so sweeps first."""
    wanted = settings.runtimes
    return wanted is None or Tier.OCI in wanted or Tier.GVISOR in wanted
