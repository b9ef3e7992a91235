"""Weaver's Prometheus metrics (DESIGN §13), served at `/metrics` (`api.app`).

Names and labels follow Prometheus' conventions (`treadle_` prefix, base units, `_total` for
counters). No label carries a tenant's data (ids, names, metadata): routes are their
templates (`/v1/sandboxes/{sandbox_id}`), never the paths asked for. What the store holds
(executions by state, sandboxes by status, the queue) is counted when scraped; what happens
(requests, dispatches) is counted as it happens, per replica.

Each Weaver has its own registry, so that several in one process (tests) do not share one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

from treadle.weaver.store import tables

if TYPE_CHECKING:
    from treadle.weaver.core import Weaver

__all__ = ["CONTENT_TYPE", "WeaverMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WeaverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.http_requests = Counter(
            "treadle_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "treadle_http_request_duration_seconds",
            "Time to answer an HTTP request (its response's start), by method and route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "treadle_dispatch_latency_seconds",
            "From an execution queued on this replica to its assignment sent to a node.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dispatched = Counter(
            "treadle_dispatched_executions",
            "Execution attempts this replica assigned to nodes.",
            registry=registry,
        )
        self.executions = Gauge(
            "treadle_executions",
            "Executions in the store, by state.",
            ["state"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "treadle_dispatch_queue_depth",
            "Open executions that no node holds yet.",
            registry=registry,
        )
        self.sandboxes = Gauge(
            "treadle_sandboxes",
            "Sandboxes in the store that have not ended, by status.",
            ["status"],
            registry=registry,
        )
        self.ledger_delay = Histogram(
            "treadle_usage_record_delay_seconds",
            "From the end of a usage record's interval (by its node's clock) to its storage.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
            registry=registry,
        )
        self.export_lag = Gauge(
            "treadle_usage_export_lag_seconds",
            "How long the oldest usage record not yet exported has been stored (0: none).",
            registry=registry,
        )
        self.exported = Counter(
            "treadle_usage_exported_records",
            "Usage records this replica exported (a batch sent again counts again).",
            registry=registry,
        )
        self.nodes = Gauge(
            "treadle_nodes",
            "Nodes in the store by state; `connected` counts the links this replica holds.",
            ["state"],
            registry=registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    async def refresh(self, weaver: Weaver) -> None:
        """Read the counts of what the store holds into the gauges."""
        e, s, n = tables.executions, tables.sandboxes, tables.nodes
        async with weaver.db.read() as conn:
            by_state = await _counts(conn, select(e.c.state, func.count()).group_by(e.c.state))
            queued = (
                await conn.execute(
                    select(func.count()).where(e.c.state == "open", e.c.node_id.is_(None))
                )
            ).scalar()
            live = s.c.status.notin_(("stopped", "failed"))
            by_status = await _counts(
                conn, select(s.c.status, func.count()).where(live).group_by(s.c.status)
            )
            by_node = await _counts(conn, select(n.c.state, func.count()).group_by(n.c.state))
        _set(self.executions, by_state)
        self.queue_depth.set(queued or 0)
        _set(self.sandboxes, by_status)
        by_node["connected"] = len(list(weaver.registry.sessions()))
        _set(self.nodes, by_node)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def _counts(conn: Any, query: Any) -> dict[str, int]:
    return {str(key): int(count) for key, count in (await conn.execute(query)).all()}


def _set(gauge: Gauge, values: dict[str, int]) -> None:
    """Every label value seen so far, set: those absent now are 0, not stale."""
    for labels in list(gauge._metrics):
        if labels[0] not in values:
            gauge.labels(*labels).set(0)
    for key, value in values.items():
        gauge.labels(key).set(value)
