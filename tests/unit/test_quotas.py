"""The rule that admits new work under a tenant's quotas and budget (`treadle.domain.quotas`)."""

from __future__ import annotations

import calendar

import pytest

from treadle.domain.errors import LimitExceeded
from treadle.domain.quotas import InUse, TenantLimits, admit, over_budget, period_start
from treadle.domain.resources import Resources

ASK = Resources(cpu_millicores=1000, memory_mib=1024, gpu_count=1)


def refusal(limits: TenantLimits, used: InUse, *, sandbox: bool = False) -> dict[str, object]:
    with pytest.raises(LimitExceeded) as caught:
        admit(limits, used, ASK, sandbox=sandbox)
    return dict(caught.value.details)


def test_each_quota_admits_up_to_its_limit_and_not_one_past() -> None:
    used = InUse(cpu_millicores=3000, memory_mib=3072, gpus=1, sandboxes=2)
    admit(
        TenantLimits(cpu_millicores=4000, memory_mib=4096, gpus=2, sandboxes=3),
        used,
        ASK,
        sandbox=True,
    )
    assert refusal(TenantLimits(cpu_millicores=3999), used)["limit"] == "cpu_millicores"
    assert refusal(TenantLimits(memory_mib=4095), used)["limit"] == "memory_mib"
    assert refusal(TenantLimits(gpus=1), used) == {
        "limit": "gpus",
        "value": 1,
        "in_use": 1,
        "asked": 1,
    }
    assert refusal(TenantLimits(sandboxes=2), used, sandbox=True)["limit"] == "sandboxes"
    admit(TenantLimits(sandboxes=2), used, ASK, sandbox=False)  # an execution is no sandbox
    admit(TenantLimits(), used, ASK, sandbox=True)  # no limit set: no limit


def test_a_spent_budget_refuses_new_work() -> None:
    limits = TenantLimits(budget=10.0, period="day")
    admit(limits, InUse(spent=9.99), ASK, sandbox=False)
    assert refusal(limits, InUse(spent=10.0))["limit"] == "budget"
    assert over_budget(limits, 10.0) and not over_budget(limits, 9.0)
    assert not over_budget(TenantLimits(), 1e9)


def test_periods_begin_at_midnight_utc() -> None:
    moment = calendar.timegm((2026, 12, 5, 13, 30, 0, 0, 0, 0))
    assert period_start("day", moment) == calendar.timegm((2026, 12, 5, 0, 0, 0, 0, 0, 0))
    assert period_start("month", moment) == calendar.timegm((2026, 12, 1, 0, 0, 0, 0, 0, 0))
