"""`treadle fn create|list|rm`: registering functions, and turning a file into a spec."""

from __future__ import annotations

import importlib
import json
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from treadle.cli.output import print_json
from treadle.cli.params import parse_env
from treadle.cli.state import client_from

__all__ = ["app", "build_spec", "infer_command", "load_spec_file"]

app = typer.Typer(name="fn", help="Register, list and remove functions.", no_args_is_help=True)

_SPEC_SUFFIXES = (".json", ".yaml", ".yml")
_INTERPRETERS = {".py": "python3", ".sh": "sh"}


def infer_command(filename: str, text: str) -> list[str]:
    """How to run a script uploaded as the function's source: its `#!` line, else by extension."""
    if text.startswith("#!"):
        return [f"./{filename}"]
    interpreter = _INTERPRETERS.get(Path(filename).suffix.lower())
    if interpreter is None:
        raise typer.BadParameter(
            f"cannot tell how to run {filename!r} (no #! line, not .py or .sh); "
            "say how with --command",
            param_hint="--file",
        )
    return [interpreter, filename]


def load_spec_file(path: Path) -> dict[str, Any]:
    """A full function spec from a .json file, or a .yaml/.yml one when PyYAML is installed."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise typer.BadParameter(
                f"{path} is not valid JSON: {exc}", param_hint="--file"
            ) from None
    else:
        try:
            yaml = importlib.import_module("yaml")  # optional: only YAML specs need it
        except ImportError:
            raise typer.BadParameter(
                f"reading {path} needs PyYAML (pip install pyyaml); or write the spec as JSON",
                param_hint="--file",
            ) from None
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise typer.BadParameter(
                f"{path} is not valid YAML: {exc}", param_hint="--file"
            ) from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(
            f"{path} must hold a mapping (a function spec)", param_hint="--file"
        )
    return spec


def build_spec(
    name: str,
    *,
    command: str | None = None,
    file: Path | None = None,
    env: list[str] | None = None,
    timeout: float | None = None,
    cpu: int | None = None,
    memory: int | None = None,
    isolation: str | None = None,
    min_isolation: str | None = None,
    max_attempts: int | None = None,
    image: str | None = None,
    network: bool | None = None,
    strategy: str | None = None,
    regions: list[str] | None = None,
    countries: list[str] | None = None,
    max_price: float | None = None,
    gpus: str | None = None,
) -> dict[str, Any]:
    """The body of `POST /v1/functions` from the `fn create` options; options win over the file."""
    if command is None and file is None:
        raise typer.BadParameter("say what to run with --command or --file")
    spec: dict[str, Any] = {}
    if file is not None:
        if file.suffix.lower() in _SPEC_SUFFIXES:
            spec = load_spec_file(file)
        else:
            text = file.read_text(encoding="utf-8")
            spec = {"source": text, "source_name": file.name}
            if command is None:
                spec["command"] = infer_command(file.name, text)
    spec["name"] = name
    if command is not None:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--command") from None
        if not argv:
            raise typer.BadParameter("is empty", param_hint="--command")
        spec["command"] = argv
    if "command" not in spec:
        raise typer.BadParameter(f"{file} has no command; give one with --command")
    if env:
        spec["env"] = {**(spec.get("env") or {}), **parse_env(env)}
    if timeout is not None:
        spec["timeout_s"] = timeout
    resources = {"cpu_millicores": cpu, "memory_mib": memory}
    if any(value is not None for value in resources.values()):
        spec["resources"] = {
            **(spec.get("resources") or {}),
            **{key: value for key, value in resources.items() if value is not None},
        }
    if isolation is not None:
        spec["isolation"] = isolation
    if min_isolation is not None:
        spec["min_isolation"] = min_isolation
    if max_attempts is not None:
        spec["max_attempts"] = max_attempts
    if image is not None:
        spec["image"] = image
    if network is not None:
        spec["network"] = network
    placement: dict[str, Any] = dict(spec.get("placement") or {})
    for key, value in (
        ("strategy", strategy),
        ("regions", regions or None),
        ("countries", countries or None),
        ("max_price_per_hour", max_price),
    ):
        if value is not None:
            placement[key] = value
    if gpus is not None:
        count, _, kind = gpus.partition(":")
        if not count.isdigit():
            raise typer.BadParameter("expected COUNT or COUNT:TYPE, e.g. 1:l4", param_hint="--gpus")
        placement["gpu"] = {"count": int(count), "type": kind or None}
    if placement:
        spec["placement"] = placement
    return spec


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Function name (a new version if it exists).")],
    command: Annotated[
        str | None,
        typer.Option(
            "--command", "-c", help="What to run, one shell-quoted string: 'python3 main.py {x}'."
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            exists=True,
            dir_okay=False,
            readable=True,
            help="A spec (.json/.yaml) or a script to upload as the function's source.",
        ),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", metavar="K=V", help="Repeatable.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", metavar="SECONDS", min=0.001)
    ] = None,
    cpu: Annotated[int | None, typer.Option("--cpu", metavar="MILLICORES", min=1)] = None,
    memory: Annotated[int | None, typer.Option("--memory", metavar="MIB", min=1)] = None,
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
    max_attempts: Annotated[int | None, typer.Option("--max-attempts", min=1)] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            metavar="REF",
            help="Run in this registry image (host[:port]/name[:tag]); needs the oci tier.",
        ),
    ] = None,
    network: Annotated[
        bool | None,
        typer.Option(
            "--network/--no-network",
            help="Ask for outbound network (nodes give it only where their operator allows).",
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="lowest_cost, best_performance, balanced or high_availability "
            "(custom weights go in a --file spec).",
        ),
    ] = None,
    region: Annotated[
        list[str] | None, typer.Option("--region", help="Only these regions (repeatable).")
    ] = None,
    country: Annotated[
        list[str] | None,
        typer.Option("--country", metavar="CC", help="Only these countries (repeatable)."),
    ] = None,
    max_price: Annotated[
        float | None,
        typer.Option("--max-price", metavar="PER_HOUR", help="Most its share may cost per hour."),
    ] = None,
    gpus: Annotated[
        str | None, typer.Option("--gpus", metavar="COUNT[:TYPE]", help="GPUs it needs.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the function as JSON.")] = False,
) -> None:
    """Register a function, or a new version of one."""
    spec = build_spec(
        name,
        command=command,
        file=file,
        env=env,
        timeout=timeout,
        cpu=cpu,
        memory=memory,
        isolation=isolation,
        min_isolation=min_isolation,
        max_attempts=max_attempts,
        image=image,
        network=network,
        strategy=strategy,
        regions=region,
        countries=country,
        max_price=max_price,
        gpus=gpus,
    )
    function = client_from(ctx).create_function(spec)
    if as_json:
        print_json(function)
    else:
        typer.echo(f"{function.get('name')} version {function.get('version')}")


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List functions (the latest version of each)."""
    from treadle.cli.tables import functions_table, print_table

    items = client_from(ctx).list_functions()["items"]
    if as_json:
        print_json(items)
    else:
        print_table(functions_table(items, datetime.now(UTC)), empty="no functions")


@app.command("rm")
def remove(ctx: typer.Context, name: str) -> None:
    """Delete a function and all its versions (its executions are kept)."""
    client_from(ctx).delete_function(name)
    typer.echo(f"removed {name}")
