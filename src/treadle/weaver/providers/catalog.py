"""Offer catalogs: CSV files of the machines clouds rent out and their hourly prices.

The files have the shape of SkyPilot's catalogs, one per provider (`aws.csv` → provider
"aws"), with the columns `InstanceType, AcceleratorName, AcceleratorCount, vCPUs, MemoryGiB,
Price, SpotPrice, Region, AvailabilityZone, Country` and optionally `Runtimes` (tiers separated
by `;`). Prices are USD per hour for the whole machine; an empty SpotPrice means no spot
market. Where each file's prices come from, and when they were taken, is in
`catalog/SOURCES.md` next to them. Lines starting with `#` are comments.

Every row is checked when loaded, and a bad one is an error naming its file and line: a
catalog that quietly dropped rows would make the scheduler's cheapest choice wrong.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from treadle.domain.errors import TreadleError
from treadle.domain.resources import Tier, gpu_type
from treadle.scheduler.offers import Offer

__all__ = [
    "CATALOG_COLUMNS",
    "CLOUD_RUNTIMES",
    "CatalogError",
    "default_catalog_paths",
    "gpu_type",
    "load_catalog",
]

CATALOG_COLUMNS = (
    "InstanceType",
    "AcceleratorName",
    "AcceleratorCount",
    "vCPUs",
    "MemoryGiB",
    "Price",
    "SpotPrice",
    "Region",
    "AvailabilityZone",
    "Country",
)
# What a Shuttle on a cloud VM offers: real isolation, never the bare `process` tier.
CLOUD_RUNTIMES = frozenset({Tier.NAMESPACE, Tier.OCI, Tier.GVISOR})
_COUNTRY = re.compile(r"^[A-Z]{2}$")

CatalogSource = str | os.PathLike[str] | Traversable


class CatalogError(TreadleError):
    """A catalog file that cannot be read, or a row in it that is not a valid offer."""

    code = "catalog_invalid"


def default_catalog_paths() -> list[Traversable]:
    """The catalog files shipped with treadle (package data), in name order."""
    folder = files(__package__ or "treadle.weaver.providers") / "catalog"
    return sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".csv")),
        key=lambda entry: entry.name,
    )


def load_catalog(
    paths: Iterable[CatalogSource] | None = None, *, provider: str | None = None
) -> list[Offer]:
    """Offers from catalog files (default: the shipped ones), optionally of one provider.

    Offer names (`provider/instance_type/zone-or-region`) are unique across what is loaded.
    """
    sources: list[CatalogSource] = list(default_catalog_paths() if paths is None else paths)
    offers: list[Offer] = []
    seen: dict[str, str] = {}
    for source in sources:
        entry = _traversable(source)
        name = entry.name
        if not name.endswith(".csv"):
            raise CatalogError(f"{name}: a catalog file's name must end in .csv (aws.csv)")
        owner = name.removesuffix(".csv")
        if provider is not None and owner != provider:
            continue
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{name}: cannot read: {exc}") from None
        for line, offer in _parse(owner, name, text):
            where = f"{name} line {line}"
            if offer.name in seen:
                raise CatalogError(f"{where}: offer {offer.name} is already in {seen[offer.name]}")
            seen[offer.name] = where
            offers.append(offer)
    return offers


def _traversable(source: CatalogSource) -> Traversable:
    if isinstance(source, str | os.PathLike):
        return Path(source)
    return source


def _parse(provider: str, name: str, text: str) -> Iterable[tuple[int, Offer]]:
    # Comment lines become empty ones, which the reader skips, so line numbers stay right.
    lines = ["" if line.lstrip().startswith("#") else line for line in text.splitlines()]
    reader = csv.DictReader(io.StringIO("\n".join(lines)), restkey="\0extra")
    header = reader.fieldnames
    if header is None:
        raise CatalogError(f"{name}: empty catalog (no header line)")
    missing = [column for column in CATALOG_COLUMNS if column not in header]
    if missing:
        raise CatalogError(
            f"{name} line {reader.line_num}: header lacks column(s) {', '.join(missing)}"
        )
    for row in reader:
        line = reader.line_num
        try:
            yield line, _offer(provider, row)
        except (ValueError, TypeError) as exc:
            raise CatalogError(f"{name} line {line}: {exc}") from None


def _offer(provider: str, row: Mapping[str, str | list[str] | None]) -> Offer:
    if "\0extra" in row:
        raise ValueError(f"more fields than the {len(row) - 1} columns of the header")
    if any(value is None for value in row.values()):
        raise ValueError("fewer fields than the columns of the header")

    def text(column: str) -> str:
        value = row.get(column)
        return value.strip() if isinstance(value, str) else ""

    instance_type = text("InstanceType")
    if not instance_type:
        raise ValueError("InstanceType is empty")
    region = text("Region")
    if not region:
        raise ValueError("Region is empty")
    vcpus = _number(text("vCPUs"), "vCPUs")
    memory_gib = _number(text("MemoryGiB"), "MemoryGiB")
    price = _number(text("Price"), "Price")
    spot_text = text("SpotPrice")
    spot = _number(spot_text, "SpotPrice") if spot_text else None
    if spot is not None and spot > price:
        raise ValueError(f"SpotPrice {spot:g} is above the on-demand Price {price:g}")

    gpu_name = text("AcceleratorName")
    count_text = text("AcceleratorCount")
    gpu_count = 0
    if count_text:
        count = _number(count_text, "AcceleratorCount")
        if count != int(count):
            raise ValueError(f"AcceleratorCount must be a whole number, got {count_text!r}")
        gpu_count = int(count)
    if gpu_name and not gpu_count:
        raise ValueError(f"AcceleratorName {gpu_name!r} needs an AcceleratorCount ≥ 1")
    if gpu_count and not gpu_name:
        raise ValueError("a row with accelerators needs an AcceleratorName (the GPU type)")

    country = text("Country") or None
    if country is not None and not _COUNTRY.match(country):
        raise ValueError(f"Country must be an ISO 3166 code such as DE, got {country!r}")

    return Offer(
        provider=provider,
        instance_type=instance_type,
        region=region,
        zone=text("AvailabilityZone") or None,
        country=country,
        cpu_millicores=round(vcpus * 1000),
        memory_mib=round(memory_gib * 1024),
        price_per_hour=price,
        spot_price_per_hour=spot,
        gpu_count=gpu_count,
        gpu_type=gpu_type(gpu_name) if gpu_name else None,
        runtimes=_runtimes(text("Runtimes")),
    )


def _number(value: str, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{column} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{column} must be a number > 0, got {value!r}")
    return number


def _runtimes(value: str) -> frozenset[Tier]:
    if not value:
        return CLOUD_RUNTIMES
    names = [part.strip() for part in value.split(";") if part.strip()]
    try:
        return frozenset(Tier(name) for name in names)
    except ValueError:
        known = ", ".join(tier.value for tier in Tier)
        raise ValueError(
            f"Runtimes must be tiers ({known}) separated by ';', got {value!r}"
        ) from None
