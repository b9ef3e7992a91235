"""Typed Shuttle settings, layered by pydantic-settings (defaults < env `TREADLE_SHUTTLE_*`
< explicit values, which is where the CLI puts its flags)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from treadle.domain.resources import Tier
from treadle.shuttle.sandbox import ids

__all__ = ["ShuttleSettings", "default_home"]

_MIB = 1024 * 1024
_AGENT_PATH = "/v1/agent"
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def default_home() -> Path:
    """`$TREADLE_HOME/shuttle`, with TREADLE_HOME defaulting to ~/.local/share/treadle."""
    root = os.environ.get("TREADLE_HOME") or Path.home() / ".local" / "share" / "treadle"
    return Path(root) / "shuttle"


class ShuttleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TREADLE_SHUTTLE_", extra="ignore", frozen=True)

    # one address, or several comma-separated (Weaver replicas), tried in turn
    weaver_url: str
    # Kept out of repr so that logging the settings never prints the join token.
    token: str | None = Field(default=None, repr=False)
    home: Path = Field(default_factory=default_home)
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=253)
    labels: dict[str, str] = Field(default_factory=dict)
    region: str | None = None
    zone: str | None = None
    provider: str = "local"
    price_per_hour: float = Field(default=0.0, ge=0)
    country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    spot: bool = False
    spot_price_per_hour: float | None = Field(default=None, ge=0)
    # None: measured at start-up.
    perf_score: float | None = Field(default=None, gt=0, le=1e6)
    taints: dict[str, str] = Field(default_factory=dict)
    # How often running work's usage is recorded and sent to Weaver, in seconds.
    usage_interval_s: float = Field(default=5.0, ge=0.1, le=3600)
    # False: record no usage at all (for measuring what metering costs; this node's work
    # is then neither metered nor priced).
    metering: bool = True
    # Where to serve Prometheus metrics ("host:port"); None: nowhere.
    metrics_addr: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9.:\[\]-]{0,253}:[0-9]{1,5}$"
    )
    # "COUNT:TYPE": advertise GPUs that are not there (demos and tests of placement on a
    # machine without GPUs); programs see made-up device ids.
    simulated_gpus: str | None = Field(
        default=None, pattern=r"^[1-9][0-9]{0,3}:[a-z0-9][a-z0-9-]{0,63}$"
    )
    allow_process_runtime: bool = False
    # Offer the microvm tier (QEMU and the guest image of scripts/build-guest), where it
    # works here (`treadle up` asks for it).
    microvm: bool = False
    # The microvm tier's warm pool (`treadle.shuttle.live.pool`): VMs kept booted for each
    # shape of workload asked for (0: no pool), and the memory they may hold together,
    # which the node then does not advertise as its capacity.
    microvm_warm: int = Field(default=0, ge=0, le=64)
    microvm_warm_mib: int = Field(default=2048, ge=0, le=1 << 24)
    # Network for sandboxed executions whose function asks for it (namespace and microvm);
    # without it, no execution has network.
    allow_network: bool = False
    # Registries (host:port) reached over plain HTTP without certificate checks: meant for
    # a registry on this host's loopback or a trusted private network.
    insecure_registries: list[str] = Field(default_factory=list)
    # The registries functions' images may come from (host[:port]; "docker.io" for bare
    # names); None: any. Pulls use this node's network and credentials, so operators of
    # shared fleets should name them.
    allowed_registries: list[str] | None = None
    # Where Shuttle runs as root, each workload's sandbox ids map to host ids of its own from
    # here on (`ids.SLOT_SIZE` per workload, up to `ids.DEFAULT_SLOTS` workloads): give each
    # Shuttle on a host its own.
    sandbox_ids_base: int = Field(default=ids.DEFAULT_BASE, ge=1, le=ids.MAX_BASE)
    # Processes (and threads) one sandboxed execution may run at once.
    pids_max: int = Field(default=256, ge=8)
    # The program behind the oci tier; None: crun where it works, else runc.
    oci_tool: Literal["crun", "runc"] | None = None
    # the tiers to offer, of those that work here; None: all of them
    runtimes: list[Tier] | None = None
    cpu_millicores: int | None = Field(default=None, ge=1)
    memory_mib: int | None = Field(default=None, ge=1)
    max_unacked_bytes: int = Field(default=8 * _MIB, ge=1)

    @field_validator("weaver_url")
    @classmethod
    def _weaver_url(cls, value: str) -> str:
        for url in _split(value):
            parts = urlsplit(url)
            if parts.scheme not in _WS_SCHEME or not parts.netloc:
                raise ValueError(
                    "weaver_url must be http(s):// or ws(s):// URLs with a host, "
                    f"comma-separated; got {url!r}"
                )
        if not _split(value):
            raise ValueError("weaver_url names no address")
        return value

    @property
    def agent_urls(self) -> list[str]:
        """The WebSocket addresses of Weaver's agent endpoint, one per `weaver_url` entry."""
        return [_agent_url(url) for url in _split(self.weaver_url)]

    @property
    def agent_url(self) -> str:
        return self.agent_urls[0]


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _agent_url(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith(_AGENT_PATH):
        path += _AGENT_PATH
    return urlunsplit((_WS_SCHEME[parts.scheme], parts.netloc, path, parts.query, ""))
