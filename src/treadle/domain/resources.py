"""Resources a piece of work asks for and a node offers, and the isolation tiers."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Resources", "Tier", "gpu_type"]


class Tier(StrEnum):
    """Isolation tiers, weakest first (DESIGN §4)."""

    PROCESS = "process"
    NAMESPACE = "namespace"
    OCI = "oci"
    GVISOR = "gvisor"
    MICROVM = "microvm"

    @property
    def strength(self) -> int:
        return _ORDER.index(self)


_ORDER = list(Tier)


class Resources(BaseModel):
    """An amount of node capacity; used both for requests and for capacity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_millicores: int = Field(default=1000, ge=1, le=10_000_000)
    memory_mib: int = Field(default=256, ge=1, le=100_000_000)
    disk_mib: int = Field(default=1024, ge=0, le=1_000_000_000)
    gpu_count: int = Field(default=0, ge=0, le=1024)
    gpu_type: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _gpu_type_needs_gpus(self) -> Resources:
        if self.gpu_type is not None and self.gpu_count == 0:
            raise ValueError("gpu_type is set but gpu_count is 0")
        return self

    def fits_in(self, free: Resources) -> bool:
        if self.gpu_count and self.gpu_type and free.gpu_type != self.gpu_type:
            return False
        return (
            self.cpu_millicores <= free.cpu_millicores
            and self.memory_mib <= free.memory_mib
            and self.disk_mib <= free.disk_mib
            and self.gpu_count <= free.gpu_count
        )

    def minus(self, other: Resources) -> Resources:
        return Resources.model_construct(
            cpu_millicores=self.cpu_millicores - other.cpu_millicores,
            memory_mib=self.memory_mib - other.memory_mib,
            disk_mib=self.disk_mib - other.disk_mib,
            gpu_count=self.gpu_count - other.gpu_count,
            gpu_type=self.gpu_type,
        )

    def plus(self, other: Resources) -> Resources:
        return Resources.model_construct(
            cpu_millicores=self.cpu_millicores + other.cpu_millicores,
            memory_mib=self.memory_mib + other.memory_mib,
            disk_mib=self.disk_mib + other.disk_mib,
            gpu_count=self.gpu_count + other.gpu_count,
            gpu_type=self.gpu_type,
        )


_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro"}
_PREFIX_WORDS = {"rtx", "gtx"}


def gpu_type(name: str) -> str:
    """The GPU model as requests name it, from a device's name or a price catalog's: "NVIDIA
    H100 80GB HBM3" → "h100", "NVIDIA A100-SXM4-80GB" and "A100-80GB" → "a100", "NVIDIA
    GeForce RTX 4090" and "RTX 4090" → "rtx4090", "Tesla T4" → "t4". Memory variants are not
    told apart: nodes and offers must name the same model."""
    words = [w for w in re.split(r"[\s_]+", name.lower()) if w and w not in _VENDOR_WORDS]
    if not words:
        return name.lower()[:64]
    model = words[0].split("-")[0]
    if model in _PREFIX_WORDS and len(words) > 1:
        model += words[1].split("-")[0]
    return model[:64]
