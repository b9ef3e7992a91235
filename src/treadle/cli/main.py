"""The `treadle` command: global options, the command tree, and error reporting."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from treadle import __version__
from treadle.cli import batches, executions, explain, functions, nodes, sandboxes, servers
from treadle.cli.state import CLIState

__all__ = ["app", "main"]


class _Group(TyperGroup):
    """Reports SDK errors (API, connection, configuration) as `error: …`, exit 1.

    Every command runs inside the root group's `invoke`, so this is the one place that turns
    them into a message instead of a traceback.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # Imported here, not at the top: `treadle --help` should not load httpx.
            from treadle.cli.output import print_error
            from treadle.client.errors import TreadleClientError

            if not isinstance(exc, TreadleClientError):
                raise
            print_error(exc)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="treadle",
    cls=_Group,
    help="Run other people's code on a fleet of machines.",
    no_args_is_help=True,
    # A traceback's locals would include the API key.
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"treadle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Weaver's URL; else $TREADLE_URL, else http://127.0.0.1:8700.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="API key; else $TREADLE_API_KEY, else the key in $TREADLE_HOME/admin.key.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    state = CLIState(url=url, api_key=api_key)
    ctx.obj = state
    ctx.call_on_close(state.close)


app.add_typer(functions.app)
app.add_typer(nodes.tenant_app)
app.add_typer(sandboxes.app)
app.command()(executions.invoke)
app.command("map")(batches.map_command)
app.command()(executions.logs)
app.command()(executions.cancel)
app.command()(executions.ps)
app.command()(explain.explain)
app.command()(nodes.nodes)
app.command()(nodes.usage)
servers.register(app)


def main() -> None:
    app()
