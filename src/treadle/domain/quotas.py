"""A tenant's budget and quotas (DESIGN §13), as an admin sets them, and the rule that admits
new work under them.

Quotas bound what a tenant's work holds at once: CPU, memory and GPUs reserved by its open
and running executions and its sandboxes that have not ended, and the number of those
sandboxes. A budget bounds what its work costs in a period (the calendar day or month, UTC),
from the usage ledger. New work that would pass a limit is refused, naming the limit and the
use (`LimitExceeded`, 429). A hard budget also stops (or pauses) the tenant's running work
once it is spent; a soft one only warns.
"""

from __future__ import annotations

import calendar
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from treadle.domain.errors import LimitExceeded
from treadle.domain.resources import Resources

__all__ = [
    "BUDGET_EXCEEDED",
    "InUse",
    "TenantLimits",
    "admissible",
    "admit",
    "over_budget",
    "period_start",
]

# Why a hard budget ended work: an execution's error, a sandbox's end reason.
BUDGET_EXCEEDED = "budget_exceeded"


class TenantLimits(BaseModel):
    """`PUT /v1/tenants/{id}/limits`; a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cpu_millicores: int | None = Field(default=None, ge=0)
    memory_mib: int | None = Field(default=None, ge=0)
    gpus: int | None = Field(default=None, ge=0)
    sandboxes: int | None = Field(default=None, ge=0)
    # What its work may cost per period, in the currency of the nodes' prices.
    budget: float | None = Field(default=None, ge=0)
    period: Literal["day", "month"] = "month"
    # Hard: running work is stopped (or paused) once the budget is spent; soft: a warning.
    hard: bool = False
    on_exceeded: Literal["stop", "pause"] = "stop"


class InUse(BaseModel):
    """What a tenant's work holds now, and what it cost this period."""

    cpu_millicores: int = 0
    memory_mib: int = 0
    gpus: int = 0
    sandboxes: int = 0
    spent: float = 0.0


def period_start(period: str, now: float | None = None) -> float:
    """When the current day or month began, UTC."""
    moment = time.gmtime(time.time() if now is None else now)
    day = 1 if period == "month" else moment.tm_mday
    return float(calendar.timegm((moment.tm_year, moment.tm_mon, day, 0, 0, 0, 0, 0, 0)))


def admit(limits: TenantLimits, used: InUse, asked: Resources, *, sandbox: bool) -> None:
    """Refuse (`LimitExceeded`, naming the limit and the use) new work that would pass one of
    `limits`: `asked` is what it reserves, `sandbox` whether it is a sandbox."""
    admitted, refusal = admissible(limits, used, asked, 1, sandbox=sandbox)
    if refusal is not None and admitted < 1:
        raise refusal


def admissible(
    limits: TenantLimits, used: InUse, asked: Resources, count: int, *, sandbox: bool = False
) -> tuple[int, LimitExceeded | None]:
    """How many of `count` pieces of new work, each reserving `asked`, fit under `limits`
    (the first ones of a batch), and the refusal the rest get (None when all fit)."""
    if limits.budget is not None and used.spent >= limits.budget:
        return 0, LimitExceeded(
            f"the tenant's budget of {limits.budget:g} a {limits.period} is spent "
            f"({used.spent:.6g} so far this {limits.period})",
            details={
                "limit": "budget",
                "value": limits.budget,
                "spent": used.spent,
                "period": limits.period,
            },
        )
    checks = [
        ("cpu_millicores", limits.cpu_millicores, used.cpu_millicores, asked.cpu_millicores),
        ("memory_mib", limits.memory_mib, used.memory_mib, asked.memory_mib),
        ("gpus", limits.gpus, used.gpus, asked.gpu_count),
        ("sandboxes", limits.sandboxes, used.sandboxes, 1 if sandbox else 0),
    ]
    admitted, refusal = count, None
    for name, limit, now, more in checks:
        if limit is None or not more:
            continue
        fits = max(0, (limit - now) // more)
        if fits < admitted:
            admitted = fits
            refusal = LimitExceeded(
                f"the tenant's {name} quota is {limit}: its work holds {now} and this asks "
                f"{more} more",
                details={"limit": name, "value": limit, "in_use": now, "asked": more},
            )
    return admitted, refusal


def over_budget(limits: TenantLimits, spent: float) -> bool:
    return limits.budget is not None and spent >= limits.budget
