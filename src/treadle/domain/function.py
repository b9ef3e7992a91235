"""Functions: what to run, validated once when registered; and rendering a command with args."""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from treadle.domain.errors import InvalidRequest
from treadle.domain.images import ImageReferenceError, parse_image
from treadle.domain.resources import Resources, Tier

__all__ = [
    "CRITERIA",
    "IMAGE_TIERS",
    "STORED",
    "FunctionSpec",
    "GpuSpec",
    "PlacementSpec",
    "PresetStrategy",
    "Strategy",
    "WorkloadSpec",
    "check_placeholders",
    "ensure_json_safe",
    "placeholders",
    "render_command",
]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Only bare identifiers: str.format would also allow `{x.__class__}` style attribute walks.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RESERVED_ENV_PREFIX = "TREADLE_"
# Validation context of a spec read back from the store: it was accepted when registered.
STORED = "stored"
# Tiers that can run a function's own root filesystem.
IMAGE_TIERS = (Tier.OCI, Tier.GVISOR, Tier.MICROVM)


def ensure_json_safe(value: Any, max_depth: int | None = None) -> None:
    """Refuse what standard JSON cannot carry faithfully: NaN and infinities (Python's parser
    accepts them) and strings that are not valid Unicode (lone surrogates). Stored, they
    would fail later, when the work is sent to a node, instead of now, with a clear 422.
    With `max_depth`, also what nests arrays and objects deeper than that.

    One pass, iterative (the value may be far too deep to recurse into), stopping at the
    first fault; what is not a JSON type goes to `json.dumps`, which says what it makes of
    it. (A walk, not a serialization: it was a twentieth of Weaver's time in batch invoke.)
    """
    deepest = _DEEPEST if max_depth is None else max_depth
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                _unicode(item)
        elif kind is float:
            if item != item or item in (_INF, -_INF):
                raise ValueError(f"not representable in JSON: {item!r}")
        elif kind is dict or kind is list or kind is tuple:
            if depth + 1 > deepest:
                raise ValueError(f"nested deeper than {deepest} levels of arrays and objects")
            if kind is dict:
                for key in item:
                    if type(key) is not str:
                        _other({key: None})  # as json writes such a key, or refuses it
                    elif not key.isascii():
                        _unicode(key)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        elif item is not None and kind is not int and kind is not bool:
            _other(item)


_INF = float("inf")
# Past this depth a value is refused even where no limit is asked for: only a value that
# contains itself gets there (parsed JSON stops far sooner).
_DEEPEST = 100_000


def _other(value: Any) -> None:
    """What json makes of a value of another type (a subclass, a key that is not text)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as exc:  # UnicodeEncodeError is a ValueError too
        raise ValueError(f"not representable in JSON: {exc}") from None


def _unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not representable in JSON: {exc}") from None


# The order every weight tuple and every score breakdown follows (DESIGN §5).
CRITERIA: tuple[str, ...] = ("cost", "performance", "load", "reliability", "locality")
# The strategies with weights of their own; `custom` takes the function's.
PresetStrategy = Literal["lowest_cost", "best_performance", "balanced", "high_availability"]
Strategy = Literal[PresetStrategy, "custom"]
_COUNTRY = r"^[A-Z]{2}$"


class GpuSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=0, le=1024)
    type: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _type_needs_a_count(self) -> GpuSpec:
        if self.type is not None and self.count == 0:
            raise ValueError("a gpu type needs a count of at least 1")
        return self


class PlacementSpec(BaseModel):
    """Where work may run (hard constraints) and how to choose among those places
    (`strategy`, and `weights` for `custom`), DESIGN §5."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    strategy: Strategy | None = None  # None: the operator's default
    weights: dict[str, float] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    regions: list[str] = Field(default_factory=list, max_length=64)
    zones: list[str] = Field(default_factory=list, max_length=64)
    countries: list[Annotated[str, Field(pattern=_COUNTRY)]] = Field(
        default_factory=list, max_length=64
    )
    tolerations: list[str] = Field(default_factory=list, max_length=64)
    gpu: GpuSpec | None = None
    max_price_per_hour: float | None = Field(default=None, gt=0)
    spot: bool = False

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        for name, weight in value.items():
            if name not in CRITERIA:
                raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
            if weight < 0:
                raise ValueError(f"weight of {name} must be ≥ 0")
        if not any(value.values()):
            raise ValueError("at least one weight must be above 0")
        return value

    @model_validator(mode="after")
    def _weights_go_with_custom(self) -> PlacementSpec:
        if self.strategy == "custom" and self.weights is None:
            raise ValueError("strategy custom needs weights")
        if self.weights is not None and self.strategy != "custom":
            raise ValueError("weights are only for strategy custom")
        return self


class WorkloadSpec(BaseModel):
    """What every workload, function or sandbox, is made of and placed by: one set of rules
    for images, environments, tiers, network and placement."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # A registry reference (treadle.domain.images), which also bounds its length.
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=1024)
    resources: Resources = Field(default_factory=Resources)
    # An exact tier, or the weakest acceptable one (process < namespace < oci < gvisor <
    # microvm). With neither, the weakest tier at least the fleet's default (namespace
    # unless the operator raises it); see treadle.scheduler.tiers.
    isolation: Tier | None = None
    min_isolation: Tier | None = None
    # Outbound network for the program; only nodes whose operator allows it can run it.
    network: bool = False
    placement: PlacementSpec = Field(default_factory=PlacementSpec)

    @field_validator("min_isolation")
    @classmethod
    def _one_isolation_rule(cls, value: Tier | None, info: ValidationInfo) -> Tier | None:
        if value is not None and info.data.get("isolation") is not None:
            raise ValueError("give isolation (an exact tier) or min_isolation, not both")
        return value

    @model_validator(mode="before")
    @classmethod
    def _placement_gpu_is_the_resource_request(cls, data: Any) -> Any:
        """`placement.gpu` and `resources.gpu_*` say the same thing: one fills the other,
        and two that disagree are refused."""
        if not isinstance(data, dict):
            return data
        placement, resources = data.get("placement"), data.get("resources")
        gpu = placement.get("gpu") if isinstance(placement, dict) else None
        if not isinstance(gpu, dict) or (resources is not None and not isinstance(resources, dict)):
            return data
        resources = dict(resources or {})
        wanted = {"gpu_count": gpu.get("count", 0), "gpu_type": gpu.get("type")}
        for key, value in wanted.items():
            if key in resources and resources[key] != value:
                raise ValueError(f"placement.gpu and resources.{key} disagree")
        return {**data, "resources": {**resources, **wanted}}

    @field_validator("image")
    @classmethod
    def _image_is_a_registry_reference(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A stored spec may predate today's grammar; the node parses its image with the same
        # grammar and refuses one it does not accept.
        if value is None or (info.context or {}).get(STORED):
            return value
        try:
            parse_image(value)
        except ImageReferenceError as exc:
            raise ValueError(
                f"image must be a registry reference, [host[:port]/]name[:tag][@sha256:digest]: "
                f"{exc}"
            ) from None
        return value

    @model_validator(mode="after")
    def _image_needs_a_container_tier(self) -> Self:
        isolation = self.isolation
        if self.image is not None and isolation is not None and isolation not in IMAGE_TIERS:
            raise ValueError(
                f"an image runs only in the {', '.join(t.value for t in IMAGE_TIERS)} "
                f"tiers, not {isolation.value}"
            )
        return self

    @property
    def tier_floor(self) -> Tier | None:
        """The weakest tier the workload may run in, when it names no exact one: an image
        needs a container runtime."""
        floor = self.min_isolation
        if self.image is not None and (floor is None or floor.strength < Tier.OCI.strength):
            return Tier.OCI
        return floor

    @model_validator(mode="after")
    def _json_safe(self) -> Self:
        ensure_json_safe(self.model_dump(mode="json"))
        return self

    @field_validator("env")
    @classmethod
    def _env_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ENV_KEY.match(key):
                raise ValueError(f"env name {key!r} is not a valid variable name")
            if key.startswith(_RESERVED_ENV_PREFIX):
                raise ValueError(f"env name {key!r} uses the reserved prefix TREADLE_")
            if "\x00" in val:
                raise ValueError(f"env value of {key!r} contains a NUL byte")
        return value


class FunctionSpec(WorkloadSpec):
    """The body of `POST /v1/functions`; immutable once stored as a version."""

    name: str = Field(pattern=NAME_PATTERN)
    command: list[str] = Field(min_length=1, max_length=4096)
    source: str | None = Field(default=None, max_length=1_048_576)
    source_name: str = Field(default="main", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    timeout_s: float = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    max_attempts: int = Field(default=3, ge=1, le=20)

    @field_validator("command")
    @classmethod
    def _command_is_argv(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("command[0] must name a program")
        for arg in value:
            if "\x00" in arg:
                raise ValueError("command arguments cannot contain NUL bytes")
        return value


def placeholders(command: list[str]) -> set[str]:
    """The `{name}` placeholders used in a command."""
    return set(_placeholders(tuple(command)))


def check_placeholders(command: list[str], args: dict[str, Any]) -> None:
    """An InvalidRequest naming the args `command`'s placeholders need and `args` lacks."""
    missing = sorted(name for name in placeholders(command) if name not in args)
    if missing:
        raise InvalidRequest(
            f"args missing for command placeholders: {', '.join(missing)}",
            details=[
                {"loc": ["body", "args", name], "msg": "required by the command"}
                for name in missing
            ],
        )


@functools.lru_cache(maxsize=1024)
def _has_braces(command: tuple[str, ...]) -> bool:
    return any("{" in arg or "}" in arg for arg in command)


@functools.lru_cache(maxsize=1024)
def _placeholders(command: tuple[str, ...]) -> frozenset[str]:
    # Every execution of a function renders the same command: parse it once.
    names: set[str] = set()
    for arg in command:
        for match in _PLACEHOLDER.finditer(arg):
            if match.group(1):
                names.add(match.group(1))
    return frozenset(names)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def render_command(command: list[str], args: dict[str, Any]) -> list[str]:
    """Substitute `{name}` with args[name] (strings as-is, other values as JSON).

    `{{` and `}}` stand for literal braces. A placeholder without a matching arg is an
    InvalidRequest naming the missing args.
    """
    if not _has_braces(tuple(command)):
        return list(command)  # nothing to substitute: most commands, every execution
    check_placeholders(command, args)

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return _as_text(args[match.group(1)])

    return [_PLACEHOLDER.sub(substitute, arg) for arg in command]
