"""Rich tables for the list commands, and the small formatters they share."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "executions_table",
    "format_age",
    "format_duration",
    "functions_table",
    "nodes_table",
    "print_table",
    "tenants_table",
    "usage_table",
]

_STATE_STYLES = {
    "open": "yellow",
    "running": "cyan",
    "success": "green",
    "failure": "red",
    "timeout": "magenta",
    "cancelled": "dim",
    "ready": "green",
    "draining": "yellow",
    "disconnected": "magenta",
    "down": "red",
}
_MAX_COMMAND_WIDTH = 60


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # The API writes UTC; a timestamp without an offset is read as UTC, not local time.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_age(value: Any, now: datetime) -> str:
    """How long ago an ISO 8601 timestamp was: `42s`, `5m`, `3h`, `2d`; `-` if unknown."""
    then = _parse_time(value)
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_duration(milliseconds: Any) -> str:
    """`4.1ms`, `2.35s`, `3m07s`; `-` when there is none yet."""
    if not isinstance(milliseconds, int | float) or isinstance(milliseconds, bool):
        return "-"
    if milliseconds < 1000:
        return f"{milliseconds:.1f}ms"
    seconds = milliseconds / 1000
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _state(value: Any) -> str:
    text = str(value or "-")
    style = _STATE_STYLES.get(text)
    return f"[{style}]{text}[/]" if style else text


def _text(value: Any) -> str:
    from rich.markup import escape

    return "-" if value is None or value == "" else escape(str(value))


def _table(*columns: str) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def functions_table(functions: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    table = _table("NAME", "VERSION", "COMMAND", "ISOLATION", "CREATED")
    for fn in functions:
        command = fn.get("command")
        text = shlex.join(command) if isinstance(command, list) else str(command)
        if len(text) > _MAX_COMMAND_WIDTH:
            text = text[: _MAX_COMMAND_WIDTH - 1] + "…"
        table.add_row(
            _text(fn.get("name")),
            _text(fn.get("version")),
            _text(text),
            _text(fn.get("isolation") or "default"),
            format_age(fn.get("created_at"), now),
        )
    return table


def executions_table(executions: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    table = _table("ID", "FUNCTION", "STATE", "EXIT", "NODE", "AGE", "DURATION")
    for ex in executions:
        table.add_row(
            _text(ex.get("id")),
            _text(f"{ex.get('function')}:{ex.get('version')}"),
            _state(ex.get("state")),
            _text(ex.get("exit_code")),
            _text(ex.get("node_id")),
            format_age(ex.get("created_at"), now),
            format_duration(ex.get("duration_ms")),
        )
    return table


def _share(allocated: Any, capacity: Any, key: str, scale: float = 1) -> str:
    used = allocated.get(key) if isinstance(allocated, Mapping) else None
    total = capacity.get(key) if isinstance(capacity, Mapping) else None
    if not isinstance(total, int | float):
        return "-"
    used = used if isinstance(used, int | float) else 0
    return f"{used / scale:g}/{total / scale:g}"


def nodes_table(nodes: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    table = _table(
        "ID",
        "NAME",
        "STATE",
        "RUNTIMES",
        "CPU (cores)",
        "MEMORY (MiB)",
        "PRICE",
        "REGION",
        "HEARTBEAT",
    )
    for node in nodes:
        allocated, capacity = node.get("allocated"), node.get("capacity")
        runtimes = node.get("runtimes")
        price = node.get("price_per_hour")
        table.add_row(
            _text(node.get("id")),
            _text(node.get("name")),
            _state(node.get("state")),
            _text(" ".join(map(str, runtimes)) if isinstance(runtimes, list) else runtimes),
            _share(allocated, capacity, "cpu_millicores", scale=1000),
            _share(allocated, capacity, "memory_mib"),
            f"${price:.4g}/h" if isinstance(price, int | float) else "-",
            _text(node.get("region")),
            format_age(node.get("last_heartbeat"), now),
        )
    return table


def tenants_table(tenants: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    table = _table("ID", "NAME", "PROCESS TIER", "CREATED")
    for tenant in tenants:
        table.add_row(
            _text(tenant.get("id")),
            _text(tenant.get("name")),
            "[yellow]allowed[/]" if tenant.get("allow_process_tier") else "-",
            format_age(tenant.get("created_at"), now),
        )
    return table


def usage_table(summary: Mapping[str, Any]) -> Table:
    """One row per group of `GET /v1/usage`, and the totals."""
    groups = list(summary.get("group_by") or [])
    table = _table(*(g.upper() for g in groups), "RECORDS", "WALL", "CPU s", "GiB·s", "COST")
    for column in table.columns[len(groups) :]:
        column.justify = "right"

    def row(key: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
        return [
            *(_text(key.get(g)) for g in groups),
            str(values.get("records", 0)),
            format_duration(float(values.get("wall_s") or 0) * 1000),
            f"{float(values.get('cpu_s') or 0):.2f}",
            f"{float(values.get('memory_gib_s') or 0):.2f}",
            f"{float(values.get('cost') or 0):.6f}",
        ]

    for group in summary.get("groups") or []:
        table.add_row(*row(group.get("key") or {}, group))
    totals = summary.get("totals") or {}
    if totals.get("records"):
        label = ["total", *([""] * (len(groups) - 1))] if groups else []
        table.add_row(*label, *row({}, totals)[len(groups) :], style="bold")
    return table


def print_table(table: Table, *, empty: str) -> None:
    from rich.console import Console

    console = Console()
    if table.row_count == 0:
        console.print(f"[dim]{empty}[/]")
    else:
        console.print(table)
