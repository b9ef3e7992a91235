"""`treadle sandbox …`: create sandboxes, run processes in them, copy files in and out."""

from __future__ import annotations

import contextlib
import os
import posixpath
import select
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from treadle.cli.output import EXIT_CANCELLED, EXIT_FAILURE, EXIT_TIMEOUT, print_json
from treadle.cli.params import parse_env, split_pair
from treadle.cli.state import client_from

if TYPE_CHECKING:
    from rich.table import Table

    from treadle.client import ExecResult, Sandbox, SandboxProcess

__all__ = ["app", "exit_code_of", "split_location"]

app = typer.Typer(
    name="sandbox",
    help="Create sandboxes, run processes in them, and copy files in and out.",
    no_args_is_help=True,
)

_SIGNAL_BASE = 128
# `shell` without a command: bash where the sandbox has it, else sh.
_DEFAULT_SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash; exec sh"]
_READ_SIZE = 64 * 1024

SandboxId = Annotated[str, typer.Argument(metavar="ID", help="The sandbox's id (sbx_…).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def exit_code_of(result: ExecResult) -> int:
    """What the CLI exits with for a process: its own exit code, 128 + N when signal N
    killed it (as shells report it), 124 when its timeout did, and 1 when it never ran."""
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.exit_code is not None and 0 <= result.exit_code < 256:
        return result.exit_code
    if result.signal is not None:
        return _SIGNAL_BASE + result.signal
    return EXIT_FAILURE


def split_location(spec: str) -> tuple[str | None, str]:
    """`ID:path` → (ID, path); anything else is a local path → (None, path). As with
    `docker cp`, a colon after a `/` belongs to a local path (write `./a:b` for one)."""
    head, sep, rest = spec.partition(":")
    if sep and head and "/" not in head:
        return head, rest or "."
    return None, spec


def _display(size: str) -> dict[str, int]:
    """--desktop WxH as the create body's `desktop`."""
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise typer.BadParameter(
            f"{size!r} is not WIDTHxHEIGHT (e.g. 1280x800)", param_hint="--desktop"
        )
    return {"width": int(width), "height": int(height)}


def _sandbox(ctx: typer.Context, sandbox_id: str) -> Sandbox:
    from treadle.client import Sandbox

    return Sandbox(sandbox_id, client=client_from(ctx))


def _write(channel: str, data: bytes) -> None:
    target = sys.stderr if channel == "stderr" else sys.stdout
    target.flush()
    target.buffer.write(data)
    target.buffer.flush()


def _ref(value: str) -> int | str:
    return int(value) if value.isdigit() else value


# --- lifecycle -------------------------------------------------------------------------


@app.command("create")
def create(
    ctx: typer.Context,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            metavar="REF",
            help="Run in this registry image (host[:port]/name[:tag]); needs the oci tier.",
        ),
    ] = None,
    isolation: Annotated[
        str | None,
        typer.Option(
            "--isolation", metavar="TIER", help="process, namespace, oci, gvisor or microvm."
        ),
    ] = None,
    min_isolation: Annotated[
        str | None,
        typer.Option(
            "--min-isolation", metavar="TIER", help="The weakest tier acceptable (see --isolation)."
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            min=0.001,
            help="Its TTL: stopped (or paused, --on-expiry) this long from now (default 300).",
        ),
    ] = None,
    on_expiry: Annotated[
        str | None, typer.Option("--on-expiry", help="stop or pause, when the TTL runs out.")
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option("--metadata", "-m", metavar="K=V", help="A label to find it by. Repeatable."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", metavar="K=V", help="For every process. Repeatable."),
    ] = None,
    network: Annotated[
        bool | None,
        typer.Option(
            "--network/--no-network",
            help="Ask for outbound network (nodes give it only where their operator allows).",
        ),
    ] = None,
    cpu: Annotated[int | None, typer.Option("--cpu", metavar="MILLICORES", min=1)] = None,
    memory: Annotated[int | None, typer.Option("--memory", metavar="MIB", min=1)] = None,
    disk: Annotated[int | None, typer.Option("--disk", metavar="MIB", min=0)] = None,
    restart: Annotated[
        str | None,
        typer.Option(
            "--restart",
            help="on_failure, always or never: whether it starts again, fresh, when lost.",
        ),
    ] = None,
    home: Annotated[
        str | None,
        typer.Option(
            "--home", metavar="PATH", help="Its writable work dir: HOME, where processes start."
        ),
    ] = None,
    sudo: Annotated[
        bool,
        typer.Option("--sudo", help="Its user may run commands as root with `sudo`."),
    ] = False,
    desktop: Annotated[
        str | None,
        typer.Option(
            "--desktop",
            metavar="WxH",
            help="A display of this size (e.g. 1280x800), with ctrl and a live view.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sandbox as JSON.")] = False,
) -> None:
    """Create a sandbox and print its id.

    It starts in the background; `exec` and `shell` wait for it.
    """
    from treadle.client import Sandbox

    resources = {"cpu_millicores": cpu, "memory_mib": memory, "disk_mib": disk}
    options: dict[str, Any] = {
        "image": image,
        "isolation": isolation,
        "min_isolation": min_isolation,
        "timeout": timeout,
        "on_expiry": on_expiry,
        "metadata": dict(split_pair(item, "--metadata") for item in metadata or []) or None,
        "env": parse_env(env or []) or None,
        "network": network,
        "resources": {k: v for k, v in resources.items() if v is not None} or None,
        "restart": restart,
        "home": home,
        "sudo": sudo or None,
        "desktop": _display(desktop) if desktop else None,
    }
    sandbox = Sandbox.create(client=client_from(ctx), **options)
    if as_json:
        print_json(sandbox.info)
    else:
        typer.echo(sandbox.id)


@app.command("ls")
def list_sandboxes(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="pending, starting, running, paused, stopping, stopped or failed. Repeatable.",
        ),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(
            "--metadata", "-m", metavar="K=V", help="Only those with this label. Repeatable."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    all_: Annotated[
        bool, typer.Option("--all", help="Every matching sandbox, not just --limit.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List sandboxes, newest first."""
    from treadle.cli.tables import print_table
    from treadle.client import Sandbox

    labels = dict(split_pair(item, "--metadata") for item in metadata or [])
    found = Sandbox.list(
        status=status or None,
        metadata=labels,
        client=client_from(ctx),
        page_size=500 if all_ else min(limit, 500),
    )
    items = list(found if all_ else islice(found, limit))
    if as_json:
        print_json(items)
    else:
        print_table(_sandboxes_table(items, datetime.now(UTC)), empty="no sandboxes")


@app.command("get")
def get(ctx: typer.Context, sandbox_id: SandboxId) -> None:
    """Print a sandbox as JSON."""
    print_json(_sandbox(ctx, sandbox_id).refresh())


@app.command("pause")
def pause(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Return once its node has paused it.")
    ] = True,
) -> None:
    """Freeze every process of a sandbox in place, memory kept.

    Not in the process tier, which has no boundary to freeze.
    """
    sandbox = _sandbox(ctx, sandbox_id)
    info = sandbox.pause()
    if wait:
        info = sandbox.wait_for_status("paused")
    typer.echo(f"{sandbox.id} {info['status']}")


@app.command("resume")
def resume(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Return once it runs again.")
    ] = True,
) -> None:
    """Thaw a paused sandbox."""
    sandbox = _sandbox(ctx, sandbox_id)
    info = sandbox.resume()
    if wait:
        info = sandbox.wait_for_status("running")
    typer.echo(f"{sandbox.id} {info['status']}")


@app.command("rm")
def remove(
    ctx: typer.Context,
    sandbox_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Sandboxes to stop.")],
) -> None:
    """Stop sandboxes and free all they hold; prints each id.

    Their processes get SIGTERM, then SIGKILL after 5 s. Removing a stopped one is a no-op.
    """
    from treadle.cli.output import print_error
    from treadle.client import TreadleAPIError

    failed = False
    for sandbox_id in sandbox_ids:
        try:
            _sandbox(ctx, sandbox_id).kill()
        except TreadleAPIError as exc:  # the others are still stopped
            print_error(exc)
            failed = True
            continue
        typer.echo(sandbox_id)
    if failed:
        raise typer.Exit(EXIT_FAILURE)


@app.command("url")
def url(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    port: Annotated[int, typer.Argument(min=1, max=65535, help="A port the sandbox listens on.")],
    path: Annotated[str, typer.Option("--path", help="The path the URL opens.")] = "/",
    expires_in: Annotated[
        float, typer.Option("--expires-in", metavar="SECONDS", min=1, help="How long it works.")
    ] = 3600.0,
) -> None:
    """Print a signed URL to a port of a sandbox.

    The URL works without any header (in a browser, with curl) until it expires.
    """
    typer.echo(_sandbox(ctx, sandbox_id).url(port, path=path, expires_in=expires_in))


# --- desktop ---------------------------------------------------------------------------


@app.command("screenshot")
def screenshot(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    output: Annotated[
        str,
        typer.Option("--output", "-o", metavar="FILE", help="Where to write it (- for stdout)."),
    ],
    image_format: Annotated[
        str | None,
        typer.Option("--format", help="png or jpeg (default: from FILE's name, else png)."),
    ] = None,
    quality: Annotated[
        int | None, typer.Option("--quality", min=1, max=100, help="JPEG's quality.")
    ] = None,
) -> None:
    """Save a desktop sandbox's screen as PNG or JPEG."""
    chosen = image_format or ("jpeg" if output.lower().endswith((".jpg", ".jpeg")) else "png")
    data = _sandbox(ctx, sandbox_id).desktop.screenshot(format=chosen, quality=quality)
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(output).write_bytes(data)


@app.command("view")
def view(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    control: Annotated[
        bool, typer.Option("--control", help="Let whoever opens it use the mouse and keyboard.")
    ] = False,
    expires_in: Annotated[
        float, typer.Option("--expires-in", metavar="SECONDS", min=1, help="How long it works.")
    ] = 3600.0,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open it in this machine's browser too.")
    ] = False,
) -> None:
    """Print a URL that shows a desktop sandbox's screen live in a browser.

    View-only unless --control; anyone with the URL can open it until it expires.
    """
    link = _sandbox(ctx, sandbox_id).desktop.stream_url(
        view_only=not control, expires_in=expires_in
    )
    typer.echo(link)
    if open_browser:
        import webbrowser

        webbrowser.open(link)


# --- processes -------------------------------------------------------------------------


@app.command("exec")
def exec_command(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    cmd: Annotated[
        list[str],
        typer.Argument(metavar="CMD...", help="The program and its arguments, after --."),
    ],
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Feed our stdin to it, to its end.")
    ] = False,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Name it, for `logs` and `ps` (and to attach).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", metavar="K=V", help="Repeatable.")
    ] = None,
    cwd: Annotated[
        str | None, typer.Option("--cwd", help="Where it starts (default: the sandbox's home).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", min=0.001, help="Kill it after this long."),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", "-u", help="Run it as this user of the sandbox's (e.g. root)."),
    ] = None,
) -> None:
    """Run a process in a sandbox: stream its output live, exit with its exit code.

    Its stdout goes to stdout, its stderr to stderr. Exit codes: its own, 128+N when
    signal N killed it, 124 when --timeout did. Ctrl-C sends it SIGINT and exits 130.
    """
    process = _sandbox(ctx, sandbox_id).exec(
        cmd,
        stdin=interactive,
        tag=tag,
        env=parse_env(env or []) or None,
        cwd=cwd,
        timeout=timeout,
        user=user,
    )
    with process:
        pump = _InputPump(process, sys.stdin.fileno(), tty=False) if interactive else None
        if pump is not None:
            pump.start()
        try:
            raise typer.Exit(_stream(process))
        finally:
            if pump is not None:
                pump.stop()


@app.command("shell")
def shell(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    cmd: Annotated[
        list[str] | None,
        typer.Argument(metavar="[CMD...]", help="What to run, after -- (default: bash, else sh)."),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", "-u", help="As this user of the sandbox's (e.g. root)."),
    ] = None,
) -> None:
    """Open an interactive shell in a sandbox, in a terminal the size of ours.

    Our terminal is in raw mode while it runs (Ctrl-C and Ctrl-D go to the sandbox) and is
    restored at the end. When our stdin is not a terminal, it is fed to the shell through
    a pipe instead. Exits with the shell's exit code.
    """
    sandbox = _sandbox(ctx, sandbox_id)
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        with sandbox.exec(cmd or _DEFAULT_SHELL, stdin=True, user=user) as process:
            pump = _InputPump(process, fd, tty=False)
            pump.start()
            try:
                raise typer.Exit(_stream(process))
            finally:
                pump.stop()
    import termios
    import tty

    with sandbox.exec(
        cmd or _DEFAULT_SHELL, stdin=True, pty=_terminal_size(fd), user=user
    ) as process:
        pump = _InputPump(process, fd, tty=True)
        saved = termios.tcgetattr(fd)
        previous = signal.signal(signal.SIGWINCH, pump.on_resize)
        try:
            tty.setraw(fd)
            pump.start()
            code = _stream(process)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, previous)
            pump.stop()
    raise typer.Exit(code)


@app.command("logs")
def logs(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    ref: Annotated[str, typer.Argument(metavar="PID|TAG", help="The process, by pid or tag.")],
) -> None:
    """Follow a process of a sandbox again, by pid or tag; exit with its exit code.

    First comes the output it kept while nobody was attached (its last MiB), then its
    output live.
    """
    with _sandbox(ctx, sandbox_id).attach(_ref(ref)) as process:
        raise typer.Exit(_stream(process, interrupt=False))


@app.command("ps")
def ps(ctx: typer.Context, sandbox_id: SandboxId, as_json: JsonOption = False) -> None:
    """List the processes of a sandbox: running ones, and those ended but kept."""
    from treadle.cli.tables import print_table

    items = _sandbox(ctx, sandbox_id).processes()
    if as_json:
        print_json(items)
    else:
        print_table(_processes_table(items), empty="no processes")


def _stream(process: SandboxProcess, *, interrupt: bool = True) -> int:
    """Write the output as it comes; the exit code the CLI ends with. Ctrl-C sends the
    process SIGINT when `interrupt` (it is ours), else only stops watching."""
    try:
        for channel, data in process:
            _write(channel, data)
        return exit_code_of(process.wait())
    except KeyboardInterrupt:
        if interrupt:
            from treadle.client import TreadleClientError

            # A stream that is gone has nothing more to tell it.
            with contextlib.suppress(TreadleClientError):
                process.signal(signal.SIGINT)
        return EXIT_CANCELLED


def _terminal_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return (24, 80)
    return (max(1, min(size.lines, 1000)), max(1, min(size.columns, 1000)))


class _InputPump(threading.Thread):
    """Copies our stdin to the process as it comes. With a terminal, a resize of ours
    (SIGWINCH, through `on_resize`) becomes a resize of the process's."""

    def __init__(self, process: SandboxProcess, fd: int, *, tty: bool) -> None:
        super().__init__(name="treadle-stdin", daemon=True)
        self._process = process
        self._fd = fd
        self._tty = tty
        # A pipe wakes the select: "w" for a resize, "q" to stop.
        self._wake_r, self._wake_w = os.pipe()

    def on_resize(self, _signum: int, _frame: Any) -> None:
        os.write(self._wake_w, b"w")  # a signal handler does nothing more than this

    def stop(self) -> None:
        os.write(self._wake_w, b"q")
        if self.is_alive():
            self.join(timeout=1.0)
        if not self.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def run(self) -> None:
        from treadle.client import TreadleClientError

        # The stream or our stdin is gone: the main thread reports what matters.
        with contextlib.suppress(OSError, TreadleClientError):
            self._pump()

    def _pump(self) -> None:
        reading = True
        while True:
            ready, _, _ = select.select(
                [self._wake_r, self._fd] if reading else [self._wake_r], [], []
            )
            if self._wake_r in ready:
                woken = os.read(self._wake_r, 64)
                if b"q" in woken:
                    return
                if b"w" in woken:
                    self._process.resize(*_terminal_size(self._fd))
            if reading and self._fd in ready:
                data = os.read(self._fd, _READ_SIZE)
                if data:
                    self._process.write(data)
                elif not self._tty:
                    self._process.close_stdin()
                    reading = False
                else:
                    reading = False


# --- files -----------------------------------------------------------------------------


@app.command("cp")
def cp(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="SRC", help="ID:path, a local path, or -.")],
    target: Annotated[str, typer.Argument(metavar="DST", help="ID:path, a local path, or -.")],
) -> None:
    """Copy files between a sandbox and here, as `docker cp` does.

    One side is `ID:path` (relative to the sandbox's home), the other a local path.
    Directories are copied whole. A target that is an existing directory receives the
    source under its own name. `-` is our stdin (as SRC) or stdout (as DST), for one file.
    Symbolic links in a sandbox's directory are skipped, with a warning.
    """
    from_id, from_path = split_location(source)
    to_id, to_path = split_location(target)
    if (from_id is None) == (to_id is None):
        raise typer.BadParameter(
            "exactly one of SRC and DST must be ID:path (a sandbox's file)", param_hint="SRC"
        )
    if to_id is not None:
        _upload(_sandbox(ctx, to_id), from_path, to_path)
    else:
        assert from_id is not None
        _download(_sandbox(ctx, from_id), from_path, to_path)


def _remote_is_dir(sandbox: Sandbox, path: str) -> bool:
    from treadle.client import TreadleAPIError

    try:
        return bool(sandbox.files.stat(path).get("type") == "dir")
    except TreadleAPIError as exc:
        if exc.status == 404:
            return False
        raise


def _upload(sandbox: Sandbox, source: str, target: str) -> None:
    if source == "-":
        sandbox.files.write(target, sys.stdin.buffer.read())
        return
    local = Path(source)
    if not local.exists():
        raise typer.BadParameter(f"{source} does not exist", param_hint="SRC")
    if target.endswith("/") or _remote_is_dir(sandbox, target):
        target = posixpath.join(target, local.resolve().name)
    if not local.is_dir():
        _upload_file(sandbox, local, target)
        return
    sandbox.files.mkdir(target)
    for root, dirs, files in os.walk(local):
        here = Path(root)
        remote = posixpath.join(target, here.relative_to(local).as_posix())
        for name in dirs:
            sandbox.files.mkdir(posixpath.join(remote, name))
        for name in files:
            _upload_file(sandbox, here / name, posixpath.join(remote, name))


def _upload_file(sandbox: Sandbox, local: Path, target: str) -> None:
    sandbox.files.write(target, local.read_bytes(), mode=stat.S_IMODE(local.stat().st_mode))


def _download(sandbox: Sandbox, source: str, target: str) -> None:
    entry = sandbox.files.stat(source)
    if target == "-":
        if entry.get("type") == "dir":
            raise typer.BadParameter(f"{source} is a directory; name a local one", param_hint="DST")
        sys.stdout.buffer.write(sandbox.files.read(source))
        sys.stdout.buffer.flush()
        return
    local = Path(target)
    if local.is_dir():
        local = local / (posixpath.basename(posixpath.normpath(source)) or "sandbox")
    if entry.get("type") == "dir":
        _download_dir(sandbox, source, local)
    else:
        _download_file(sandbox, source, local, entry)


def _download_file(sandbox: Sandbox, source: str, local: Path, entry: Mapping[str, Any]) -> None:
    local.write_bytes(sandbox.files.read(source))
    mode = entry.get("mode")
    if isinstance(mode, int):
        local.chmod(stat.S_IMODE(mode) & 0o777)


def _download_dir(sandbox: Sandbox, source: str, local: Path) -> None:
    local.mkdir(exist_ok=True)
    for item in sandbox.files.list(source):
        name = str(item.get("name", ""))
        # The names come from the sandbox: none may step out of the directory it fills.
        if not name or name in (".", "..") or "/" in name or "\x00" in name:
            typer.secho(f"warning: skipped an entry named {name!r}", fg="yellow", err=True)
            continue
        remote = posixpath.join(source, name)
        if item.get("type") == "dir":
            _download_dir(sandbox, remote, local / name)
        elif item.get("type") == "file":
            _download_file(sandbox, remote, local / name, item)
        else:
            typer.secho(f"warning: skipped {remote} ({item.get('type')})", fg="yellow", err=True)


# --- tables ----------------------------------------------------------------------------


def _labels(metadata: Any) -> str:
    if not isinstance(metadata, Mapping) or not metadata:
        return "-"
    return ",".join(f"{key}={value}" for key, value in sorted(metadata.items()))


def _expires(sandbox: Mapping[str, Any], now: datetime) -> str:
    from treadle.cli.tables import format_age

    if sandbox.get("status") in ("stopped", "failed"):
        return "-"
    try:
        then = datetime.fromisoformat(str(sandbox.get("expires_at")))
    except ValueError:
        return "-"
    # format_age measures from a time to `now`: from now to the expiry, here.
    then = then if then.tzinfo else then.replace(tzinfo=UTC)
    return "in " + format_age(now.isoformat(), then)


def _sandboxes_table(sandboxes: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    from treadle.cli.tables import _state, _table, _text, format_age

    table = _table("ID", "STATUS", "ISOLATION", "NODE", "AGE", "EXPIRES", "METADATA")
    for sbx in sandboxes:
        table.add_row(
            _text(sbx.get("id")),
            _state(sbx.get("status")),
            _text(sbx.get("isolation")),
            _text(sbx.get("node_id")),
            format_age(sbx.get("created_at"), now),
            _expires(sbx, now),
            _text(_labels(sbx.get("metadata"))),
        )
    return table


def _process_state(process: Mapping[str, Any]) -> str:
    if process.get("running"):
        return "[cyan]running[/]"
    if process.get("signal") is not None:
        return f"[red]killed ({process['signal']})[/]"
    code = process.get("exit_code")
    return "[green]exited 0[/]" if code == 0 else f"[red]exited {code}[/]"


def _processes_table(processes: Iterable[Mapping[str, Any]]) -> Table:
    import shlex

    from treadle.cli.tables import _table, _text

    table = _table("PID", "TAG", "COMMAND", "PTY", "STATE")
    for process in processes:
        argv = process.get("argv")
        command = shlex.join(argv) if isinstance(argv, list) else argv
        table.add_row(
            _text(process.get("pid")),
            _text(process.get("tag")),
            _text(command),
            "yes" if process.get("pty") else "-",
            _process_state(process),
        )
    return table
