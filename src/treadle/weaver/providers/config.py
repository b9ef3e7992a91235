"""The providers Weaver may start nodes from, read from a JSON file (`providers_file`).

    {"budget_per_hour": 5.0, "scale_down_after_s": 300,
     "providers": [
       {"kind": "local", "name": "eu-cheap", "max_instances": 2,
        "offers": [{"instance_type": "small", "region": "eu-west", "zone": "eu-west-a",
                    "country": "IE", "cpu_millicores": 2000, "memory_mib": 2048,
                    "price_per_hour": 0.10}]},
       {"kind": "aws", "region": "eu-central-1", "ami_id": "ami-…", "max_instances": 4}]}

Local offers default to the `process` tier (a local Shuttle runs only that); AWS offers come
from the shipped catalog unless given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from treadle.domain.resources import Tier
from treadle.scheduler.offers import Offer
from treadle.weaver.providers.aws import AwsProvider
from treadle.weaver.providers.base import Provider
from treadle.weaver.providers.local import LocalProvider
from treadle.weaver.providers.static import StaticProvider

__all__ = ["FleetConfig", "ProvidersConfigError", "load_fleet_config"]


class ProvidersConfigError(ValueError):
    pass


class OfferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    instance_type: str = Field(min_length=1, max_length=128)
    region: str = Field(min_length=1, max_length=64)
    zone: str | None = None
    country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    cpu_millicores: int = Field(ge=1)
    memory_mib: int = Field(ge=1)
    disk_mib: int | None = Field(default=None, ge=0)
    gpu_count: int = Field(default=0, ge=0)
    gpu_type: str | None = None
    price_per_hour: float = Field(ge=0)
    spot_price_per_hour: float | None = Field(default=None, ge=0)
    runtimes: list[Tier] = Field(default_factory=lambda: [Tier.PROCESS])
    labels: dict[str, str] = Field(default_factory=dict)
    perf_score: float = Field(default=1.0, gt=0)

    def offer(self, provider: str) -> Offer:
        fields = self.model_dump(exclude={"runtimes", "labels"})
        return Offer(
            provider=provider,
            runtimes=frozenset(self.runtimes),
            labels=dict(self.labels),
            **fields,
        )


class LocalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local"]
    name: str = Field(default="local", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    offers: list[OfferConfig] = Field(min_length=1)
    max_instances: int | None = Field(default=None, ge=0)


class AwsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["aws"]
    name: str = "aws"
    region: str
    ami_id: str
    offers: list[OfferConfig] | None = None
    subnet_id: str | None = None
    security_group_ids: list[str] = Field(default_factory=list)
    key_name: str | None = None
    instance_profile: str | None = None
    max_instances: int | None = Field(default=None, ge=0)
    shuttle_args: list[str] = Field(default_factory=list)


class StaticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["static"]
    name: str = "static"


ProviderConfig = Annotated[LocalConfig | AwsConfig | StaticConfig, Field(discriminator="kind")]


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # What all started nodes together may cost per hour; None: no limit but the quotas.
    budget_per_hour: float | None = Field(default=None, ge=0)
    # A started node without work for this long is released.
    scale_down_after_s: float = Field(default=300.0, gt=0)
    # A started node that has not joined by then is released and its offer tried again.
    join_timeout_s: float = Field(default=300.0, gt=0)
    providers: list[ProviderConfig] = Field(default_factory=list)

    def build(self, home: Path) -> list[Provider]:
        built: list[Provider] = []
        for entry in self.providers:
            if isinstance(entry, LocalConfig):
                offers = [o.offer(entry.name) for o in entry.offers]
                built.append(
                    LocalProvider(
                        entry.name,
                        offers,
                        home_root=home / "nodes",
                        max_instances=entry.max_instances,
                    )
                )
            elif isinstance(entry, AwsConfig):
                built.append(
                    AwsProvider(
                        entry.region,
                        ami_id=entry.ami_id,
                        offers=None
                        if entry.offers is None
                        else [o.offer(entry.name) for o in entry.offers],
                        subnet_id=entry.subnet_id,
                        security_group_ids=entry.security_group_ids,
                        key_name=entry.key_name,
                        instance_profile=entry.instance_profile,
                        max_instances=entry.max_instances,
                        shuttle_args=entry.shuttle_args,
                        name=entry.name,
                    )
                )
            else:
                built.append(StaticProvider(entry.name))
        return built


def load_fleet_config(path: Path) -> FleetConfig:
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProvidersConfigError(f"cannot read providers file {path}: {exc}") from None
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ProvidersConfigError(f"providers file {path}: {problems}") from None
