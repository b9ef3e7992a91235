"""`treadle nodes` and `treadle tenant …`: the admin commands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

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


def usage(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option("--from", metavar="TIME", help="ISO 8601 (default: a day ago).")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", metavar="TIME", help="ISO 8601 (default: now).")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            metavar="GROUPS",
            help="Comma-separated: tenant, kind, function, sandbox, node, hour, day, or "
            "label:KEY (a sandbox's metadata KEY).",
        ),
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="execution or sandbox.")] = None,
    function: Annotated[str | None, typer.Option("--function", help="Only this function.")] = None,
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Only this sandbox.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", metavar="KEY=VALUE", help="Only sandboxes with this metadata (repeatable)."
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant (admin; default: all).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What work used and cost, from the usage ledger, summed per group."""
    from treadle.cli.tables import print_table, usage_table

    for pair in label or []:
        if "=" not in pair:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
    summary = client_from(ctx).usage(
        start=start,
        end=end,
        group_by=[g for g in (by or "").split(",") if g.strip()] or None,
        kind=kind,
        function=function,
        sandbox=sandbox,
        node=node,
        tenant=tenant,
        labels=dict(pair.partition("=")[::2] for pair in label or []),
    )
    if as_json:
        print_json(summary)
    else:
        print_table(usage_table(summary), empty="no usage in that period")


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


@tenant_app.command("list")
def list_tenants(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the tenants and whether each may use the process tier."""
    from treadle.cli.tables import print_table, tenants_table

    items = client_from(ctx).tenants()["items"]
    if as_json:
        print_json(items)
    else:
        print_table(tenants_table(items, datetime.now(UTC)), empty="no tenants")


@tenant_app.command("allow-process")
def allow_process(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="The tenant's name or id.")],
    revoke: Annotated[
        bool, typer.Option("--revoke", help="Take the permission back instead.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Let a tenant's functions name the process tier, which isolates nothing: their code
    runs as the node's user and can read what it can. Only for tenants trusted with the
    nodes that offer that tier."""
    client = client_from(ctx)
    found = _tenant_named(client.tenants()["items"], tenant)
    updated = client.update_tenant(found["id"], allow_process_tier=not revoke)
    if as_json:
        print_json(updated)
        return
    state = "may" if updated["allow_process_tier"] else "may not"
    typer.echo(f"tenant {updated['name']} ({updated['id']}) {state} use the process tier")


def _tenant_named(tenants: list[dict[str, Any]], tenant: str) -> dict[str, Any]:
    # An id first: a name may look like another tenant's id.
    for key in ("id", "name"):
        for item in tenants:
            if item[key] == tenant:
                return item
    typer.secho(
        f"error: no tenant named {tenant!r} (see `treadle tenant list`)", fg="red", err=True
    )
    raise typer.Exit(1)
