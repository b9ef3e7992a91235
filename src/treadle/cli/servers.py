"""The server commands: `up` (Weaver + one local Shuttle), `weaver`, `shuttle`.

Server modules are imported inside the commands so client commands stay quick to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from treadle import serving

if TYPE_CHECKING:
    from treadle.domain.resources import Tier
    from treadle.weaver.core import Weaver
    from treadle.weaver.settings import WeaverSettings

__all__ = ["register"]

_PARENT_ENV = "TREADLE_SHUTTLE_PARENT_PID"
_PR_SET_PDEATHSIG = 1

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Data directory (default $TREADLE_HOME or ~/.local/share/treadle)."
    ),
]
MicrovmWarmOption = Annotated[
    int,
    typer.Option(
        "--microvm-warm",
        metavar="COUNT",
        min=0,
        max=64,
        help="Keep COUNT microVMs booted ahead for each shape of workload asked for (0: no "
        "warm pool; `up`: within 2048 MiB).",
    ),
]
PortOption = Annotated[int | None, typer.Option("--port", help="Port to listen on (default 8700).")]
HostOption = Annotated[
    str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")
]


def _weaver_settings(
    home: Path | None, host: str | None, port: int | None, **extra: object
) -> WeaverSettings:
    from treadle.weaver.settings import WeaverSettings

    overrides: dict[str, Any] = {"home": home, "host": host, "port": port, **extra}
    return _settings(WeaverSettings, overrides)


S = TypeVar("S", bound=BaseModel)


def _settings(cls: type[S], overrides: dict[str, Any]) -> S:
    """Settings from the given options (None: not given); a bad value is a clear error."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            typer.secho(f"error: {where}: {error['msg']}", fg="red", err=True)
        raise typer.Exit(2) from None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _require_free_port(host: str, port: int) -> None:
    if not _port_free(host, port):
        typer.secho(
            f"error: {host}:{port} is already in use (another treadle? pick one with --port)",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)


def weaver_command(
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL (default: SQLite file).")
    ] = None,
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url",
            help="NATS JetStream server for events between Weaver replicas "
            "(with a PostgreSQL --database-url), e.g. nats://host:4222.",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
    providers: Annotated[
        Path | None,
        typer.Option(
            "--providers",
            metavar="FILE",
            help="JSON file of providers to start nodes from when work fits no node "
            "(see docs/placement.md).",
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option("--strategy", help="Placement strategy of functions that name none."),
    ] = None,
    default_min_isolation: Annotated[
        str | None,
        typer.Option(
            "--default-min-isolation",
            metavar="TIER",
            help="The weakest tier for functions that name none (default namespace; e.g. "
            "gvisor). They run in the weakest tier at least this strong their node offers.",
        ),
    ] = None,
) -> None:
    """Run the control plane (API, state, scheduler). Several replicas share one fleet when
    they share a PostgreSQL database and a NATS server."""
    from treadle.weaver.providers.config import ProvidersConfigError, load_fleet_config
    from treadle.weaver.server import serve

    settings = _weaver_settings(
        home,
        host,
        port,
        database_url=database_url,
        nats_url=nats_url,
        log_level=log_level,
        providers_file=providers,
        default_strategy=strategy,
        default_min_isolation=default_min_isolation,
    )
    if settings.providers_file is not None:
        try:
            load_fleet_config(settings.providers_file)
        except ProvidersConfigError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None
    _require_free_port(settings.host, settings.port)
    serving.run(serve(settings))


def _parse_labels(values: list[str], option: str = "--label") -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        labels[key] = value
    return labels


def shuttle_command(
    weaver: Annotated[
        str,
        typer.Option(
            "--weaver",
            help="Weaver URL, e.g. http://host:8700; several comma-separated for replicas.",
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="TREADLE_SHUTTLE_TOKEN", help="Join token (first start)."),
    ] = None,
    home: Annotated[
        Path | None, typer.Option("--home", help="State directory (default $TREADLE_HOME/shuttle).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Node name (default hostname).")
    ] = None,
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE, repeatable.")] = [],  # noqa: B006
    region: Annotated[str | None, typer.Option("--region")] = None,
    zone: Annotated[str | None, typer.Option("--zone")] = None,
    provider: Annotated[str | None, typer.Option("--provider")] = None,
    price: Annotated[float | None, typer.Option("--price", help="Price per hour.")] = None,
    country: Annotated[
        str | None, typer.Option("--country", metavar="CC", help="ISO 3166 country, e.g. DE.")
    ] = None,
    spot: Annotated[
        bool, typer.Option("--spot", help="A spot node: may be reclaimed at any time.")
    ] = False,
    spot_price: Annotated[
        float | None, typer.Option("--spot-price", help="Spot price per hour.")
    ] = None,
    perf_score: Annotated[
        float | None,
        typer.Option("--perf-score", help="Relative speed (default: measured at start)."),
    ] = None,
    simulate_gpus: Annotated[
        str | None,
        typer.Option(
            "--simulate-gpus",
            metavar="COUNT:TYPE",
            help="Advertise GPUs that are not there (demos, tests).",
        ),
    ] = None,
    taint: Annotated[
        list[str],
        typer.Option("--taint", metavar="KEY=VALUE", help="Only work tolerating KEY lands here."),
    ] = [],  # noqa: B006
    cpu: Annotated[int | None, typer.Option("--cpu", help="CPU millicores to offer.")] = None,
    memory: Annotated[int | None, typer.Option("--memory", help="Memory MiB to offer.")] = None,
    allow_process_runtime: Annotated[
        bool,
        typer.Option(
            "--allow-process-runtime",
            help="Offer the 'process' tier, which isolates nothing: development only. Only "
            "tenants an admin allows it (treadle tenant allow-process) can use it.",
        ),
    ] = False,
    runtime: Annotated[
        list[str],
        typer.Option(
            "--runtime",
            metavar="TIER",
            help="Offer only this tier (repeatable); default: every tier that works here.",
        ),
    ] = [],  # noqa: B006
    microvm: Annotated[
        bool,
        typer.Option(
            "--microvm",
            help="Offer the 'microvm' tier (QEMU; the guest image of scripts/build-guest) "
            "where it works here.",
        ),
    ] = False,
    microvm_warm: MicrovmWarmOption = 0,
    microvm_warm_mib: Annotated[
        int,
        typer.Option(
            "--microvm-warm-mib",
            metavar="MIB",
            min=0,
            help="The memory all warm microVMs may hold together (guest and QEMU); the node "
            "advertises that much less.",
        ),
    ] = 2048,
    allow_network: Annotated[
        bool,
        typer.Option(
            "--allow-network",
            help="Give outbound network to executions whose function asks for it.",
        ),
    ] = False,
    oci_tool: Annotated[
        str | None,
        typer.Option("--oci-tool", metavar="crun|runc", help="The oci tier's runtime program."),
    ] = None,
    allow_registry: Annotated[
        list[str],
        typer.Option(
            "--allow-registry",
            metavar="HOST[:PORT]",
            help="Pull functions' images only from these registries (repeatable; default any).",
        ),
    ] = [],  # noqa: B006
    insecure_registry: Annotated[
        list[str],
        typer.Option(
            "--insecure-registry",
            metavar="HOST:PORT",
            help="Pull images from this registry over plain HTTP (repeatable).",
        ),
    ] = [],  # noqa: B006
    usage_interval: Annotated[
        float | None,
        typer.Option(
            "--usage-interval",
            metavar="SECONDS",
            min=0.1,
            help="How often running work's usage is recorded (default 5).",
        ),
    ] = None,
    no_metering: Annotated[
        bool,
        typer.Option(
            "--no-metering",
            help="Record no usage: this node's work is neither metered nor priced "
            "(for measuring what metering costs).",
        ),
    ] = False,
    metrics_addr: Annotated[
        str | None,
        typer.Option(
            "--metrics-addr",
            metavar="HOST:PORT",
            help="Serve Prometheus metrics there (e.g. 127.0.0.1:9101); default: none.",
        ),
    ] = None,
    sandbox_ids_base: Annotated[
        int | None,
        typer.Option(
            "--sandbox-ids-base",
            metavar="UID",
            help=(
                "Run as root: each workload's sandbox gets 65,536 host ids of its own from "
                "here on (default 100000); give each Shuttle on a host its own."
            ),
        ),
    ] = None,
) -> None:
    """Run a node agent that dials out to Weaver and runs the work it is given."""
    from treadle.shuttle.agent import Shuttle
    from treadle.shuttle.errors import ShuttleError
    from treadle.shuttle.settings import ShuttleSettings

    overrides: dict[str, Any] = {
        "weaver_url": weaver,
        "token": token,
        "home": home,
        "name": name,
        "region": region,
        "zone": zone,
        "provider": provider,
        "price_per_hour": price,
        "country": country,
        "spot_price_per_hour": spot_price,
        "perf_score": perf_score,
        "simulated_gpus": simulate_gpus,
        "cpu_millicores": cpu,
        "memory_mib": memory,
        "sandbox_ids_base": sandbox_ids_base,
        "metrics_addr": metrics_addr,
        "usage_interval_s": usage_interval,
        "metering": False if no_metering else None,
    }
    if label:
        overrides["labels"] = _parse_labels(label)
    if taint:
        overrides["taints"] = _parse_labels(taint, "--taint")
    if spot:
        overrides["spot"] = True
    if allow_process_runtime:
        overrides["allow_process_runtime"] = True
    if runtime:
        overrides["runtimes"] = runtime
    if microvm:
        overrides["microvm"] = True
    if microvm_warm:
        overrides["microvm_warm"] = microvm_warm
        overrides["microvm_warm_mib"] = microvm_warm_mib
    if allow_network:
        overrides["allow_network"] = True
    if oci_tool is not None:
        overrides["oci_tool"] = oci_tool
    if insecure_registry:
        overrides["insecure_registries"] = insecure_registry
    if allow_registry:
        overrides["allowed_registries"] = allow_registry
    settings = _settings(ShuttleSettings, overrides)
    _exit_with_parent()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            serving.run(_until_terminated(Shuttle(settings).run()))
    except ShuttleError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        raise typer.Exit(1) from None


def up_command(
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    allow_process_runtime: Annotated[
        bool,
        typer.Option(
            "--allow-process-runtime",
            help="Let the local Shuttle offer the 'process' tier too. It isolates nothing: "
            "code in it runs as this user and can read the admin key and the database. Only "
            "tenants an admin allows it (treadle tenant allow-process) can use it.",
        ),
    ] = False,
    allow_network: Annotated[
        bool,
        typer.Option(
            "--allow-network",
            help="Let the local Shuttle give outbound network (never to this machine, its "
            "network or a cloud's metadata service) to the executions and sandboxes that ask "
            "for it; E2B's SDK asks for it unless told allow_internet_access=False.",
        ),
    ] = False,
    microvm_warm: MicrovmWarmOption = 0,
) -> None:
    """Run a Weaver and one local Shuttle, with embedded defaults (SQLite, in-process events).
    The Shuttle offers the isolating tiers that work here (bubblewrap gives `namespace`;
    QEMU and the guest kernel package of scripts/build-guest give `microvm`)."""
    from treadle.weaver.core import Weaver

    settings = _weaver_settings(home, host, port)
    _require_free_port(settings.host, settings.port)
    weaver = Weaver(settings)
    asked = {"--allow-process-runtime": allow_process_runtime, "--allow-network": allow_network}
    # The microvm tier where it works here (QEMU, and the kernel package of
    # scripts/build-guest): never the default tier, since it is the strongest.
    flags = (*(flag for flag, on in asked.items() if on), "--microvm")
    if microvm_warm:
        flags += ("--microvm-warm", str(microvm_warm))
    with contextlib.suppress(KeyboardInterrupt):
        serving.run(_up(settings, weaver, flags))


def _spawn_shuttle(
    settings: WeaverSettings, url: str, flags: tuple[str, ...]
) -> subprocess.Popen[bytes]:
    # Beside Weaver's files: isolating tiers do not see them, and the process tier, which
    # could read them from anywhere as this user, is only offered when asked for.
    home = settings.home / "shuttle"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The token travels in the environment, not argv, where every local user could read it.
    env["TREADLE_SHUTTLE_TOKEN"] = (settings.home / "join.token").read_text().strip()
    env[_PARENT_ENV] = str(os.getpid())
    # Its own session: a signal meant for `up`'s process group (Ctrl-C, `timeout`) must not
    # reach the Shuttle first, or `up` would see it die and restart it while stopping.
    argv = [sys.executable, "-m", "treadle", "shuttle", "--weaver", url, "--home", str(home)]
    argv += ["--name", f"{socket.gethostname()}-local", *flags]
    with (settings.home / "shuttle.log").open("ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


async def _until_terminated(work: Coroutine[Any, Any, None]) -> None:
    """Run `work`, cancelling it on SIGTERM as Ctrl-C does, so a stopped Shuttle kills what it
    runs on its way out instead of leaving it to run unsupervised."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _exit_with_parent() -> None:
    """A Shuttle started by `up` ends when `up` does, even if `up` is killed outright: a
    leftover one would keep the node's identity and fight the next one for it."""
    expected = os.environ.pop(_PARENT_ENV, None)
    if expected is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(expected):  # the parent died before prctl took effect
        raise typer.Exit(0)


async def _up(settings: WeaverSettings, weaver: Weaver, flags: tuple[str, ...]) -> None:
    from treadle.weaver.server import serve

    ready = asyncio.Event()
    server = asyncio.create_task(serve(settings, on_ready=ready.set, weaver=weaver))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        waiter.cancel()
        await server
        return
    url = f"http://{settings.host}:{settings.port}"
    shuttle = _spawn_shuttle(settings, url, flags)
    supervisor = asyncio.create_task(_supervise(settings, url, shuttle, weaver, flags))
    try:
        await server
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor


async def _supervise(
    settings: WeaverSettings,
    url: str,
    shuttle: subprocess.Popen[bytes],
    weaver: Weaver,
    flags: tuple[str, ...],
) -> None:
    """Print where things are once the local node has joined; restart it if it dies."""
    try:
        deadline = time.monotonic() + 30
        while not weaver.registry.sessions() and time.monotonic() < deadline:
            if shuttle.poll() is not None:
                break
            await asyncio.sleep(0.05)
        sessions = weaver.registry.sessions()
        typer.echo(f"treadle is up at {url}")
        if sessions:
            _print_tiers(settings, sessions[0].hello.runtimes)
        else:
            typer.echo("  runtime tiers: none")
        typer.echo(f"  admin key:     {settings.home / 'admin.key'}")
        typer.echo(f"  join token:    {settings.home / 'join.token'}")
        typer.echo(f"  shuttle log:   {settings.home / 'shuttle.log'}")
        if not sessions:
            why = _last_error(settings.home / "shuttle.log") or "see its log"
            typer.secho(f"  warning: the local shuttle has not joined: {why}", fg="yellow")
            if "--allow-process-runtime" not in flags:
                typer.secho(_NO_ISOLATION_HINT, fg="yellow")
        typer.echo("Press Ctrl-C to stop.")
        backoff = 0.5
        while True:
            code = await asyncio.to_thread(shuttle.wait)
            typer.secho(f"local shuttle exited ({code}); restarting", fg="yellow", err=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            shuttle = _spawn_shuttle(settings, url, flags)
    finally:
        if shuttle.poll() is None:
            shuttle.terminate()
            try:
                await asyncio.to_thread(shuttle.wait, 10)
            except subprocess.TimeoutExpired:
                shuttle.kill()


_NO_ISOLATION_HINT = (
    "  the namespace tier needs bubblewrap: run `apt-get install bubblewrap slirp4netns` as "
    "root (scripts/up does), then start again"
)


def _print_tiers(settings: WeaverSettings, runtimes: list[Tier]) -> None:
    """Say what the node offers, what functions that name no tier run in, and what the
    process tier means when it is there."""
    from treadle.domain.resources import Tier
    from treadle.scheduler import tiers

    typer.echo(f"  runtime tiers: {', '.join(t.value for t in runtimes)}")
    default = tiers.default_tier(runtimes, settings.default_min_isolation)
    if default is not None:
        typer.echo(f"  default tier:  {default.value} (for functions that name none)")
    else:
        typer.secho(
            "  warning: no isolating tier here: only functions that name the process tier, "
            "of tenants allowed it, can run",
            fg="yellow",
        )
        typer.secho(_NO_ISOLATION_HINT, fg="yellow")
    if Tier.PROCESS in runtimes:
        typer.secho(
            "  warning: the process tier isolates nothing: code in it runs as this user and "
            f"can read {settings.home} (the admin key, the database). Only tenants allowed "
            "it use it: treadle tenant allow-process TENANT",
            fg="yellow",
        )


def _last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


def register(app: typer.Typer) -> None:
    """Add the server commands to `app`."""
    app.command("up")(up_command)
    app.command("weaver")(weaver_command)
    app.command("shuttle")(shuttle_command)
