"""Weaver settings: defaults < environment (TREADLE_*) < flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from treadle.domain.function import PresetStrategy
from treadle.domain.resources import Tier
from treadle.scheduler import tiers

__all__ = ["WeaverSettings", "default_home"]


def default_home() -> Path:
    explicit = os.environ.get("TREADLE_HOME")
    if explicit:
        return Path(explicit)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "treadle"


class WeaverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TREADLE_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    heartbeat_s: float = Field(default=1.0, gt=0)
    node_down_after_s: float = Field(default=3.0, gt=0)
    # after a restart, nodes need a few reconnect attempts (with backoff) to find Weaver
    node_startup_grace_s: float = Field(default=10.0, ge=0)
    # an execution no node can take fails `unschedulable` after waiting this long
    unschedulable_after_s: float = Field(default=600.0, gt=0)
    # What has ended (executions with their output, sandboxes, batches, events) is removed
    # this long after it ended; 0 keeps it forever. The usage ledger is always kept.
    history_retention_s: float = Field(
        default=30 * 86400.0, ge=0, le=100 * 365 * 86400.0, allow_inf_nan=False
    )
    # NATS JetStream for events between Weaver replicas (with PostgreSQL); none: in-process
    # The placement strategy of functions that name none (DESIGN §5).
    default_strategy: PresetStrategy = "balanced"
    # The weakest tier for functions that name none (treadle.scheduler.tiers); `process`
    # applies only to tenants allowed that tier.
    default_min_isolation: Tier = tiers.DEFAULT
    # Providers Weaver may start nodes from (treadle.weaver.providers.config); None: none.
    providers_file: Path | None = None
    # The address Shuttles on started nodes dial; default http://HOST:PORT.
    public_url: str | None = None
    nats_url: str | None = None
    nats_stream: str = Field(default="TREADLE", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_body_bytes: int = 8 * 1024 * 1024
    max_args_bytes: int = 256 * 1024
    max_stdin_bytes: int = 6 * 1024 * 1024
    # Items of one batch invoke (map); its body is bounded by max_body_bytes too.
    max_batch_items: int = Field(default=10_000, ge=1, le=1_000_000)
    # Output stored per attempt (UTF-8 bytes, stdout and stderr together): past it the rest is
    # cut with a marker line and the execution says `output_truncated`.
    max_output_bytes: int = Field(default=16 * 1024 * 1024, ge=0, le=2**62)
    max_wait_s: float = 300.0
    # Per tenant: sandboxes not yet ended, exec streams open at once, and sockets following
    # an execution's output or a batch's results open at once (on this replica).
    max_sandboxes_per_tenant: int = Field(default=100, ge=0)
    max_exec_streams_per_tenant: int = Field(default=64, ge=0)
    max_followers_per_tenant: int = Field(default=256, ge=0)
    # Where a wildcard DNS name points at Weaver: `{port}-{id}.{domain}` then reaches a
    # sandbox's port as `/v1/sandboxes/sbx_{id}/ports/{port}/` does (None: path routing only).
    sandbox_domain: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?$"
    )
    log_level: str = "warning"
    # The usage ledger exported as CloudEvents to an OpenMeter-compatible ingest endpoint
    # (e.g. https://openmeter.example/api/v1/events), with this bearer token; None: no export.
    openmeter_url: str | None = None
    openmeter_token: str | None = Field(default=None, repr=False)
    openmeter_batch: int = Field(default=500, ge=1, le=10_000)
    # The events' `source` is treadle/<this>.
    export_source: str = Field(default="weaver", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # `/metrics` without an admin key (for a scraper on a network of its own).
    metrics_public: bool = False
    # noVNC's files (Debian's `novnc`), served for desktop sandboxes' viewer pages.
    novnc_dir: Path = Path("/usr/share/novnc")
    # HTTPS on Weaver's own port: a PEM certificate (chain) and its key. Both or neither; for
    # host names under `sandbox_domain`, a wildcard certificate for `*.{domain}`.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> WeaverSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'treadle.db'}"
