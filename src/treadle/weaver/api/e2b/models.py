"""The E2B control plane's request bodies, with E2B's JSON names.

Fields a newer SDK adds are ignored, so that an upgrade does not break creation; the ones
that ask for what treadle cannot do (volumes, IAM, MCP, network rules, auto-resume) are
refused by name rather than dropped without a word.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from treadle.domain.sandbox import MAX_TIMEOUT_S

__all__ = ["ConnectBody", "NewSandbox", "PauseBody", "RefreshBody", "TimeoutBody"]

_MAX_TIMEOUT = int(MAX_TIMEOUT_S)
# Whole seconds, as E2B's API types them: `true` or "30" is not one (lax parsing would take
# `true` for 1 s).
Seconds = Annotated[int, Strict()]
# One metadata entry of treadle's 64 remembers the template.
_MAX_METADATA = 63


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class NewSandbox(_Body):
    """`NewSandbox` (`POST /sandboxes`) and `NewSandboxV2` (`POST /v2/sandboxes`)."""

    template_id: str = Field(alias="templateID", min_length=1, max_length=256)
    timeout: Seconds | None = Field(default=None, ge=1, le=_MAX_TIMEOUT)
    auto_pause: bool = Field(default=False, alias="autoPause")
    auto_pause_memory: bool = Field(default=True, alias="autoPauseMemory")
    auto_resume: dict[str, Any] | None = Field(default=None, alias="autoResume")
    allow_internet_access: bool | None = None
    secure: bool | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=_MAX_METADATA)
    env_vars: dict[str, str] = Field(default_factory=dict, alias="envVars", max_length=1024)
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    volume_mounts: list[Any] | None = Field(default=None, alias="volumeMounts")

    @model_validator(mode="after")
    def _only_what_treadle_does(self) -> NewSandbox:
        rules = {k: v for k, v in (self.network or {}).items() if k != "allowPublicTraffic"}
        refused = {
            "mcp": self.mcp,
            "iam": self.iam,
            "network rules": rules,
            "volumeMounts": self.volume_mounts,
        }
        for name, value in refused.items():
            if value:
                raise ValueError(f"{name} is not supported by treadle")
        if not isinstance(self.public_traffic, bool):
            raise ValueError("network.allowPublicTraffic must be true or false")
        if self.auto_resume and self.auto_resume.get("enabled"):
            raise ValueError("autoResume is not supported by treadle: resume with connect")
        return self

    @property
    def public_traffic(self) -> Any:
        """E2B's default: a sandbox's ports are open to anyone with their URL."""
        return (self.network or {}).get("allowPublicTraffic", True)


class ConnectBody(_Body):
    """`ConnectSandbox`, `ConnectSandboxV2` and `ResumedSandbox`."""

    timeout: Seconds | None = Field(default=None, ge=1, le=_MAX_TIMEOUT)
    # `false` asks for a cold boot from the disk alone; a paused sandbox here keeps its memory.
    memory: bool | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")

    @model_validator(mode="after")
    def _with_memory(self) -> ConnectBody:
        if self.memory is False:
            raise ValueError("memory=false (a cold boot) is not supported: a resume keeps memory")
        return self


class TimeoutBody(_Body):
    timeout: Seconds = Field(ge=1, le=_MAX_TIMEOUT)


class RefreshBody(_Body):
    duration: Seconds | None = Field(default=None, ge=0, le=3600)


class PauseBody(_Body):
    # Treadle's pause always keeps memory, which serves a filesystem-only pause too.
    memory: bool | None = None
    require_healthy_guest: bool | None = Field(default=None, alias="requireHealthyGuest")
