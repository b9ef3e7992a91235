"""What work costs (DESIGN §13): the one rule that the scheduler ranks nodes by and that
Weaver charges with, so a placement's "cheapest" and a tenant's bill never disagree.

A node is billed at its price per hour as it stands: its spot price when it is a spot node
that has one, else its list price. A workload pays for the share of the node it reserved:
the largest of its shares of the node's CPU, memory and GPUs (a node whose memory is all
reserved takes nothing more, however idle its CPUs), at most the whole node, for as long as
it held it:

    cost = price per hour * max(cpu / node cpu, memory / node memory, gpus / node gpus) * hours

A paused sandbox holds its memory only (its processes are frozen, its CPUs free for others):
it pays memory's share alone. The price a node states is its operator's (or the catalog's);
what a workload cost is never taken from the node: Weaver computes it here.
"""

from __future__ import annotations

from treadle.domain.resources import Resources

__all__ = ["cost", "node_price", "share", "unit_prices"]

_HOUR_S = 3600.0


def node_price(price_per_hour: float, spot: bool, spot_price_per_hour: float | None) -> float:
    """What an hour of the whole node costs as it is billed now."""
    if spot and spot_price_per_hour is not None:
        return spot_price_per_hour
    return price_per_hour


def unit_prices(price: float, cpu_millicores: int, memory_mib: int, gpus: int) -> tuple[float, ...]:
    """The price per hour of one millicore, one MiB and one GPU of a node of that capacity
    (a capacity of zero counts as one unit: the request then takes the whole node). A
    share's cost is the largest of amount * unit price over the resources: `share` * price."""
    return (
        price / max(cpu_millicores, 1),
        price / max(memory_mib, 1),
        price / max(gpus, 1),
    )


def share(reserved: Resources, capacity: Resources, *, paused: bool = False) -> float:
    """The share of a node of `capacity` that `reserved` holds, in [0, 1]."""
    units = unit_prices(1.0, capacity.cpu_millicores, capacity.memory_mib, capacity.gpu_count)
    held = reserved.memory_mib * units[1]
    if not paused:
        held = max(held, reserved.cpu_millicores * units[0], reserved.gpu_count * units[2])
    return min(held, 1.0)


def cost(price_per_hour: float, held: float, seconds: float) -> float:
    """What holding the share `held` of a node at that price for `seconds` costs."""
    return price_per_hour * held * max(seconds, 0.0) / _HOUR_S
