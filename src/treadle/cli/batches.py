"""`treadle map`: one function over many inputs, as one batch invoke per batch of them."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from treadle.cli.state import client_from

__all__ = ["map_command"]


def _inputs(stream: IO[str], source: str) -> Iterator[dict[str, Any]]:
    """Args objects from a JSON array, or from JSON Lines (one object per line)."""
    text = stream.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise typer.BadParameter(f"{source}: {exc}", param_hint="--args-file") from None
        lines: list[Any] = loaded
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line))
            except ValueError as exc:
                raise typer.BadParameter(
                    f"{source}, line {number}: {exc}", param_hint="--args-file"
                ) from None
    for number, args in enumerate(lines, 1):
        if not isinstance(args, dict):
            raise typer.BadParameter(
                f"{source}: input {number} is not a JSON object of args", param_hint="--args-file"
            )
        yield args


def map_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function to run (its latest version).")],
    args_file: Annotated[
        str,
        typer.Option(
            "--args-file",
            metavar="FILE|-",
            help="The inputs: a JSON array of args objects, or JSON Lines, one object a line.",
        ),
    ],
    unordered: Annotated[
        bool, typer.Option("--unordered", help="Print each result as it ends, not in order.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Inputs per request.")
    ] = 1000,
) -> None:
    """Run a function once per input, printing one JSON line per input: the execution, or
    `{"error": …}` for an input the server refused.

    Exit code 0 when every input ran and succeeded, 1 otherwise.
    """
    from treadle.client import TreadleAPIError

    client = client_from(ctx)
    if args_file == "-":
        inputs = list(_inputs(sys.stdin, "stdin"))
    else:
        try:
            with Path(args_file).open(encoding="utf-8") as handle:
                inputs = list(_inputs(handle, args_file))
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot read {args_file}: {exc.strerror}", param_hint="--args-file"
            ) from None
    all_ok = True
    results = client.map(
        name, inputs, ordered=not unordered, return_exceptions=True, batch_size=batch_size
    )
    for result in results:
        if isinstance(result, TreadleAPIError):
            all_ok = False
            line: dict[str, Any] = {
                "error": {"code": result.code, "message": result.message, "details": result.details}
            }
        else:
            all_ok = all_ok and result.get("state") == "success"
            line = result
        typer.echo(json.dumps(line, separators=(",", ":")))
    raise typer.Exit(0 if all_ok else 1)
