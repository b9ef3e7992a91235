"""The tier policy (treadle.scheduler.tiers): a function that names no tier runs in the weakest
isolating tier its node offers, at least the fleet default; the process tier only for allowed
tenants, and only when named."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from treadle.domain.function import FunctionSpec
from treadle.domain.resources import Resources, Tier
from treadle.scheduler import NodeView, Placement, Unschedulable, place, tiers
from treadle.weaver.services.dispatcher import Pending
from treadle.weaver.services.functions import FunctionRecord
from treadle.weaver.settings import WeaverSettings

P, N, C, G, M = Tier.PROCESS, Tier.NAMESPACE, Tier.OCI, Tier.GVISOR, Tier.MICROVM
IMAGE = "registry.example/team/app:v1"


def spec(**fields: Any) -> FunctionSpec:
    return FunctionSpec.model_validate({"name": "fn", "command": ["/bin/true"], **fields})


def tier(runtimes: set[Tier], allow_process: bool = False, **fields: Any) -> Tier | None:
    default = fields.pop("default", tiers.DEFAULT)
    rule = tiers.rule_for(spec(**fields), allow_process=allow_process, default=default)
    return tiers.choose(rule, runtimes)


@pytest.mark.parametrize(
    ("runtimes", "expected"),
    [
        ({P, N, C, G}, N),
        ({P, C, G}, C),
        ({P, G}, G),
        ({G, M}, G),
        ({P}, None),
    ],
)
def test_a_function_naming_no_tier_runs_in_the_weakest_isolating_tier(
    runtimes: set[Tier], expected: Tier | None
) -> None:
    assert tier(runtimes) is expected
    # being allowed the process tier does not move work there that does not name it
    assert tier(runtimes, allow_process=True) is expected


def test_the_operator_raises_the_default_and_a_function_naming_a_tier_keeps_it() -> None:
    assert tier({P, N, C, G}, default=G) is G
    assert tier({P, N, C}, default=G) is None
    assert tier({P, N, C, G}, default=G, min_isolation="oci") is C
    assert tier({P, N, C, G}, default=G, isolation="namespace") is N


def test_an_image_needs_a_container_tier_whatever_the_default() -> None:
    assert tier({N, C, G}, image=IMAGE) is C
    assert tier({N, C, G}, image=IMAGE, default=G) is G
    assert tier({N}, image=IMAGE) is None
    # The microvm tier runs images too: the weakest image tier still comes first.
    assert tier({N, Tier.MICROVM}, image=IMAGE) is Tier.MICROVM
    assert tier({Tier.MICROVM, G}, image=IMAGE, min_isolation=G) is G
    assert tier({Tier.MICROVM, C}, image=IMAGE, isolation="microvm") is Tier.MICROVM


def test_the_process_tier_only_when_named_and_allowed() -> None:
    assert tier({P, N}, allow_process=True, isolation="process") is P
    assert tier({P, N}, allow_process=True, min_isolation="process") is P
    assert tier({P, N}, allow_process=True, default=P) is P
    # not allowed: a minimum of process is met by an isolating tier; an exact one by none
    assert tier({P, N}, min_isolation="process") is N
    assert tier({P, N}, default=P) is N
    refused = tiers.rule_for(spec(isolation="process"), allow_process=False)
    assert refused.refused == tiers.PROCESS_NOT_ALLOWED
    assert tiers.choose(refused, {P, N}) is None


def test_work_asking_for_network_prefers_a_tier_that_gives_it() -> None:
    rule = tiers.rule_for(spec(network=True), allow_process=False)
    assert tiers.choose(rule, {N, C, G}, {C}, network=True) is C
    assert tiers.choose(rule, {N, C, G}, {N}, network=True) is N


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"isolation": "process"}, True),
        ({"min_isolation": "process"}, True),
        ({"isolation": "namespace"}, False),
        ({}, False),
    ],
)
def test_names_process(fields: dict[str, str], named: bool) -> None:
    assert tiers.names_process(spec(**fields)) is named


def test_default_tier_is_what_up_reports() -> None:
    assert tiers.default_tier({P, N, C, G}) is N
    assert tiers.default_tier({P, C, G}, G) is G
    assert tiers.default_tier({P}) is None
    assert tiers.default_tier({P, N}, P) is N


@given(
    runtimes=st.sets(st.sampled_from(list(Tier)), min_size=1),
    fields=st.sampled_from(
        [
            {},
            {"isolation": "process"},
            {"min_isolation": "process"},
            {"isolation": "namespace"},
            {"min_isolation": "oci"},
            {"image": IMAGE},
        ]
    ),
    default=st.sampled_from(list(Tier)),
    allow_process=st.booleans(),
)
def test_the_chosen_tier_is_offered_admitted_and_the_weakest_such(
    runtimes: set[Tier], fields: dict[str, str], default: Tier, allow_process: bool
) -> None:
    rule = tiers.rule_for(spec(**fields), allow_process=allow_process, default=default)
    chosen = tiers.choose(rule, runtimes)
    if chosen is None:
        return
    assert chosen in runtimes
    if chosen is P:
        assert allow_process and (tiers.names_process(spec(**fields)) or default is P)
    if rule.isolation is None:
        assert chosen.strength >= rule.floor.strength
        weaker = [t for t in runtimes if rule.floor.strength <= t.strength < chosen.strength]
        assert weaker == []


# The dispatcher turns the rule into the scheduler's request: nodes the rule leaves no tier on
# are never chosen.


def node(node_id: str, *runtimes: Tier) -> NodeView:
    capacity = Resources(cpu_millicores=4000, memory_mib=8192)
    return NodeView(id=node_id, capacity=capacity, free=capacity, runtimes=frozenset(runtimes))


def pending(tenant: str = "tn_1", **fields: Any) -> Pending:
    record = FunctionRecord(tenant_id=tenant, spec=spec(**fields), version=1, created_at=0.0)
    return Pending(id="ex_1", tenant_id=tenant, attempt=1, function=record, args={}, stdin=None)


@pytest.mark.parametrize("allow_process", [False, True])
def test_placement_never_picks_a_process_only_node_for_work_naming_no_tier(
    allow_process: bool,
) -> None:
    work = pending()
    rule = tiers.rule_for(work.function.spec, allow_process=allow_process)
    fleet = [node("a-plain", P), node("b-boxed", P, N)]
    for _ in range(3):
        result = place(work.request("balanced", rule), fleet)
        assert isinstance(result, Placement) and result.node_id == "b-boxed", result
    alone = place(work.request("balanced", rule), [node("a-plain", P)])
    assert isinstance(alone, Unschedulable)
    assert "at least namespace" in alone.message


def test_placement_takes_a_process_only_node_for_an_allowed_tenant_naming_it() -> None:
    work = pending(isolation="process")
    rule = tiers.rule_for(work.function.spec, allow_process=True)
    result = place(work.request("balanced", rule), [node("a-plain", P)])
    assert isinstance(result, Placement)


def test_the_fleet_default_is_a_weaver_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TREADLE_DEFAULT_MIN_ISOLATION", raising=False)
    assert WeaverSettings().default_min_isolation is tiers.DEFAULT is N
    monkeypatch.setenv("TREADLE_DEFAULT_MIN_ISOLATION", "gvisor")
    assert WeaverSettings().default_min_isolation is G
    monkeypatch.setenv("TREADLE_DEFAULT_MIN_ISOLATION", "chroot")
    with pytest.raises(ValidationError):
        WeaverSettings()
