"""Strategies, their weights, and the checks that turn a bad policy into a clear error.

A strategy is a weight per criterion, in the fixed order of `CRITERIA`. Validation is a pure
function so the API can run it on a request body and answer 422 before anything is stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from treadle.domain.function import CRITERIA

__all__ = [
    "CRITERIA",
    "PRESETS",
    "PolicyError",
    "Strategy",
    "validate_policy",
]


class Strategy(StrEnum):
    LOWEST_COST = "lowest_cost"
    BEST_PERFORMANCE = "best_performance"
    BALANCED = "balanced"
    HIGH_AVAILABILITY = "high_availability"
    CUSTOM = "custom"


PRESETS: Mapping[Strategy, tuple[float, ...]] = MappingProxyType(
    {
        Strategy.LOWEST_COST: (1.0, 0.0, 0.05, 0.0, 0.0),
        Strategy.BEST_PERFORMANCE: (0.0, 1.0, 0.1, 0.0, 0.0),
        Strategy.BALANCED: (0.4, 0.3, 0.2, 0.1, 0.0),
        Strategy.HIGH_AVAILABILITY: (0.1, 0.1, 0.2, 0.6, 0.0),
    }
)


class PolicyError(ValueError):
    """A placement policy that cannot be used; `field` names the offending part of the request
    (`strategy`, `weights`, `weights.cost`, `max_price_per_hour`, …) so an API can point at it.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _strategy(value: object) -> Strategy:
    if isinstance(value, Strategy):
        return value
    try:
        return Strategy(str(value))
    except ValueError:
        names = ", ".join(s.value for s in Strategy)
        raise PolicyError("strategy", f"must be one of {names}") from None


def validate_policy(
    strategy: Strategy | str, weights: Mapping[str, float] | None = None
) -> tuple[Strategy, tuple[float, ...]]:
    """The strategy and its weights in `CRITERIA` order, or a `PolicyError` naming the field.

    Weights belong to `custom` only: accepting them beside a preset would let a request look
    as if it tuned a preset while the preset silently won.
    """
    chosen = _strategy(strategy)
    if chosen is not Strategy.CUSTOM:
        if weights:
            raise PolicyError("weights", "only taken with strategy custom")
        return chosen, PRESETS[chosen]
    if not weights:
        raise PolicyError("weights", "strategy custom needs at least one weight")
    values = dict.fromkeys(CRITERIA, 0.0)
    for name, weight in weights.items():
        if name not in values:
            known = ", ".join(CRITERIA)
            raise PolicyError(f"weights.{name}", f"unknown criterion (one of {known})")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise PolicyError(f"weights.{name}", "must be a number")
        if not math.isfinite(weight):
            raise PolicyError(f"weights.{name}", "must be a finite number")
        if weight < 0:
            raise PolicyError(f"weights.{name}", "must be ≥ 0")
        values[name] = float(weight)
    if not any(values.values()):
        raise PolicyError("weights", "at least one weight must be > 0")
    return chosen, tuple(values[name] for name in CRITERIA)
