"""Shuttle's Prometheus metrics, served where `--metrics-addr` says (off unless asked): what
the node runs, how long its runtimes take to start work, the output it relays, and its link
to Weaver. No label holds a tenant's data (no ids, no names).

The server is prometheus_client's own, on a thread; what it reads at a scrape (the workloads
held) is a copy taken there, so a scrape never touches the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from treadle.protocol.messages import WorkloadRef
from treadle.shuttle.live.pool import PoolStats

__all__ = ["ShuttleMetrics"]

_SPAWN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ShuttleMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.spawn = Histogram(
            "treadle_shuttle_spawn_seconds",
            "From an assignment to its program started (or refused), by tier.",
            ["tier"],
            buckets=_SPAWN_BUCKETS,
            registry=registry,
        )
        self.output = Counter(
            "treadle_shuttle_output_bytes",
            "Output of executions relayed to Weaver, by stream.",
            ["stream"],
            registry=registry,
        )
        self.connected = Gauge(
            "treadle_shuttle_link_connected",
            "Whether the link to Weaver is up (1) or not (0).",
            registry=registry,
        )
        self.connects = Counter(
            "treadle_shuttle_link_connects",
            "Links to Weaver made (the first, and every reconnect).",
            registry=registry,
        )
        self._workloads: list[Callable[[], list[WorkloadRef]]] = []
        registry.register(_Workloads(self._workloads))

    def count_workloads(self, held: Callable[[], list[WorkloadRef]]) -> None:
        """Count, at each scrape, the workloads `held` says the node holds."""
        self._workloads.append(held)

    def watch_pool(self, stats: Callable[[], PoolStats]) -> None:
        """Report, at each scrape, the microvm warm pool's takes and VMs."""
        self.registry.register(_Pool(stats))

    def serve(self, address: str) -> None:
        """Serve the metrics at `address` ("host:port") from now on."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)


class _Workloads(Collector):
    def __init__(self, sources: list[Callable[[], list[WorkloadRef]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "treadle_shuttle_workloads",
            "Workloads this node holds, by kind and state (an execution's is `held`).",
            labels=["kind", "state"],
        )
        counts: dict[tuple[str, str], int] = {}
        for source in self._sources:
            try:
                refs = list(source())
            except RuntimeError:  # changed while read from this thread: the next scrape
                continue
            for ref in refs:
                key = (ref.kind, ref.state or "held")
                counts[key] = counts.get(key, 0) + 1
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], count)
        yield family


class _Pool(Collector):
    def __init__(self, stats: Callable[[], PoolStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            stats = self._stats()
        except RuntimeError:  # changed while read from this thread: the next scrape
            return
        takes = CounterMetricFamily(
            "treadle_shuttle_warm_pool_takes",
            "Starts on the microvm tier that found a warm VM of their shape (hit) or not.",
            labels=["result"],
        )
        takes.add_metric(["hit"], stats.hits)
        takes.add_metric(["miss"], stats.misses)
        yield takes
        vms = GaugeMetricFamily(
            "treadle_shuttle_warm_pool_vms",
            "The warm pool's VMs: waiting to be taken (ready), or booting.",
            labels=["state"],
        )
        vms.add_metric(["ready"], stats.ready)
        vms.add_metric(["booting"], stats.booting)
        yield vms
        yield GaugeMetricFamily(
            "treadle_shuttle_warm_pool_memory_mib",
            "The memory the warm pool's VMs may hold (guest and VMM).",
            value=stats.held_mib,
        )
        yield GaugeMetricFamily(
            "treadle_shuttle_warm_pool_shapes",
            "The shapes of workload the warm pool keeps VMs of.",
            value=stats.shapes,
        )
