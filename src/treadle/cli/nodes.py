"""`treadle nodes` and `treadle tenant create`: the admin commands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from treadle.cli.output import print_json
from treadle.cli.state import client_from

__all__ = ["nodes", "tenant_app"]

tenant_app = typer.Typer(name="tenant", help="Manage tenants (admin).", no_args_is_help=True)


def nodes(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the fleet's nodes (admin)."""
    from treadle.cli.tables import nodes_table, print_table

    items = client_from(ctx).nodes()["items"]
    if as_json:
        print_json(items)
    else:
        print_table(nodes_table(items, datetime.now(UTC)), empty="no nodes")


@tenant_app.command("create")
def create_tenant(
    ctx: typer.Context,
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a tenant and print its first API key (shown once: store it now)."""
    created = client_from(ctx).create_tenant(name)
    if as_json:
        print_json(created)
        return
    typer.echo(f"tenant   {created['tenant']['id']}")
    typer.echo(f"api key  {created['api_key']}")
