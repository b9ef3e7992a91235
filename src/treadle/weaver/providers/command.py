"""The `treadle shuttle` options that make a new node say what its offer promised.

Weaver learns a node's price, place and size only from its hello, so the options a provider
passes are what keep the scheduler's choice (an offer) and the node that joins (its hello)
the same machine: same name, region, zone, country, price, spot price and capacity.
"""

from __future__ import annotations

from collections.abc import Mapping

from treadle.scheduler.offers import Offer

__all__ = ["offer_options", "shuttle_options"]


def shuttle_options(
    *,
    weaver_url: str,
    provider: str,
    region: str | None,
    price: float,
    node_name: str | None = None,
    zone: str | None = None,
    country: str | None = None,
    spot_price: float | None = None,
    cpu_millicores: int | None = None,
    memory_mib: int | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """Options (without the program) for a Shuttle; None leaves an option out."""
    options = ["--weaver", weaver_url]
    if node_name is not None:
        options += ["--name", node_name]
    options += ["--provider", provider]
    if region is not None:
        options += ["--region", region]
    if zone is not None:
        options += ["--zone", zone]
    if country is not None:
        options += ["--country", country]
    options += ["--price", _number(price)]
    if spot_price is not None:
        options += ["--spot", "--spot-price", _number(spot_price)]
    if cpu_millicores is not None:
        options += ["--cpu", str(cpu_millicores)]
    if memory_mib is not None:
        options += ["--memory", str(memory_mib)]
    for key, value in sorted((labels or {}).items()):
        options += ["--label", f"{key}={value}"]
    return options


def offer_options(offer: Offer, *, spot: bool, node_name: str, weaver_url: str) -> list[str]:
    """Options for the Shuttle of a machine started for `offer`.

    Capacity is the offer's, not what the Shuttle would measure: the scheduler chose the offer
    because the work fits its figures, and a node that joined a little smaller (memory the
    kernel keeps) would not take the work it was started for.
    """
    if spot and offer.spot_price_per_hour is None:
        raise ValueError(f"{offer.name} has no spot price")
    return shuttle_options(
        weaver_url=weaver_url,
        node_name=node_name,
        provider=offer.provider,
        region=offer.region,
        zone=offer.zone,
        country=offer.country,
        price=offer.price_per_hour,
        spot_price=offer.spot_price_per_hour if spot else None,
        cpu_millicores=offer.cpu_millicores,
        memory_mib=offer.memory_mib,
        labels=offer.labels,
    )


def _number(value: float) -> str:
    # repr keeps every digit the catalog gave (format "g" would round 16.69464 to 16.6946).
    return repr(float(value))
