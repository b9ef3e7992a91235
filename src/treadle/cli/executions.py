"""`treadle invoke|logs|cancel|ps`: starting executions and watching them."""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Annotated

import typer

from treadle.cli.follow import follow_to_end
from treadle.cli.output import (
    EXIT_CANCELLED,
    discard_chunk,
    exit_code_for,
    print_json,
    write_chunk,
    write_output,
)
from treadle.cli.params import parse_args
from treadle.cli.state import client_from

__all__ = ["cancel", "invoke", "logs", "ps"]


def _read_stdin(source: str | None) -> str | None:
    if source is None:
        return None
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {source}: {exc.strerror}", param_hint="--stdin"
        ) from None


def invoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function to run (its latest version).")],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg",
            "-a",
            metavar="K=V",
            help="An argument; V is parsed as JSON when it can be (x=4 is a number). Repeatable.",
        ),
    ] = None,
    args_json: Annotated[
        str | None, typer.Option("--args", metavar="JSON", help="All arguments as a JSON object.")
    ] = None,
    stdin: Annotated[
        str | None,
        typer.Option("--stdin", metavar="FILE|-", help="Feed this file (or our stdin) to it."),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Print the execution id and return.")
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Repeating a key returns the same execution."),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="Place this run by lowest_cost, best_performance, balanced or "
            "high_availability instead of the function's strategy.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print no output, then the final execution as JSON.")
    ] = False,
) -> None:
    """Run a function: stream its output live and exit with its exit code.

    Exit codes: the function's own on failure, 124 on timeout, 130 when cancelled.
    Ctrl-C cancels the execution.
    """
    client = client_from(ctx)
    execution = client.invoke(
        name,
        parse_args(args_json, arg or []),
        stdin=_read_stdin(stdin),
        idempotency_key=idempotency_key,
        strategy=strategy,
    )
    if detach:
        if as_json:
            print_json(execution)
        else:
            typer.echo(execution["id"])
        return
    execution_id = execution["id"]
    try:
        final = follow_to_end(client, execution_id, discard_chunk if as_json else write_chunk)
    except KeyboardInterrupt:
        # Like a local process: an interrupt stops the code, not just our view of it.
        from treadle.client import TreadleAPIError

        with contextlib.suppress(TreadleAPIError):  # it ended meanwhile: nothing to stop
            client.cancel(execution_id)
        typer.echo(f"\ncancelled {execution_id}", err=True)
        raise typer.Exit(EXIT_CANCELLED) from None
    if as_json:
        print_json(final)
    raise typer.Exit(exit_code_for(final))


def logs(
    ctx: typer.Context,
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Stream until it ends; exit with its exit code."),
    ] = False,
) -> None:
    """Print an execution's output: its stdout to stdout, its stderr to stderr."""
    client = client_from(ctx)
    if not follow:
        write_output(client.output(execution_id))
        return
    try:
        final = follow_to_end(client, execution_id, write_chunk)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_CANCELLED) from None
    raise typer.Exit(exit_code_for(final))


def cancel(ctx: typer.Context, execution_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel an execution (its process tree is killed) and print its new state."""
    execution = client_from(ctx).cancel(execution_id)
    typer.echo(f"{execution.get('id', execution_id)} {execution.get('state')}")


def ps(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option(help="open, running, success, failure, timeout or cancelled."),
    ] = None,
    function: Annotated[str | None, typer.Option(help="Only this function's executions.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    all_: Annotated[
        bool, typer.Option("--all", help="Every matching execution, not just --limit.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List executions, newest first."""
    from treadle.cli.tables import executions_table, print_table

    client = client_from(ctx)
    if all_:
        items = list(client.iter_executions(state, function, page_size=500))
    else:
        # The API pages at most 500; a bigger --limit walks the pages.
        items = list(
            islice(client.iter_executions(state, function, page_size=min(limit, 500)), limit)
        )
    if as_json:
        print_json(items)
    else:
        print_table(executions_table(items, datetime.now(UTC)), empty="no executions")
