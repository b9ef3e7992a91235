"""Scheduling v0: feasibility filter, least-loaded choice, reasons when nothing fits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from treadle.domain.resources import Resources, Tier
from treadle.scheduler import NodeView, Placement, Request, Unschedulable, place

BIG = Resources(cpu_millicores=4000, memory_mib=8192, disk_mib=10_000)


def node(node_id: str, cpu: int = 4000, mem: int = 8192, **kw: object) -> NodeView:
    free = Resources.model_construct(
        cpu_millicores=cpu, memory_mib=mem, disk_mib=10_000, gpu_count=0, gpu_type=None
    )
    defaults: dict[str, object] = {"runtimes": frozenset({Tier.PROCESS})}
    defaults.update(kw)
    return NodeView(id=node_id, capacity=BIG, free=free, **defaults)  # type: ignore[arg-type]


def test_picks_the_least_loaded_feasible_node() -> None:
    nodes = [node("a", cpu=1000, mem=1024), node("b", cpu=3000, mem=6000), node("c", cpu=500)]
    result = place(Request(resources=Resources(cpu_millicores=800, memory_mib=512)), nodes)
    assert isinstance(result, Placement)
    assert result.node_id == "b"
    assert result.rejected == {"with too little free cpu": 1}


def test_ties_break_by_node_id() -> None:
    result = place(Request(resources=Resources()), [node("z"), node("m"), node("q")])
    assert isinstance(result, Placement) and result.node_id == "m"


def test_unschedulable_says_why() -> None:
    nodes = [node("a", runtimes=frozenset({Tier.PROCESS})), node("b", ready=False)]
    result = place(Request(resources=Resources(), isolation=Tier.NAMESPACE), nodes)
    assert isinstance(result, Unschedulable)
    assert result.rejected == {"without runtime namespace": 1, "not ready": 1}
    assert "without runtime namespace (1 node)" in result.message


def test_no_nodes_at_all() -> None:
    result = place(Request(resources=Resources()), [])
    assert isinstance(result, Unschedulable)
    assert result.message == "no node is connected"


def test_labels_and_regions_are_hard_constraints() -> None:
    nodes = [node("a", region="eu", labels={"disk": "ssd"}), node("b", region="us")]
    request = Request(resources=Resources(), labels={"disk": "ssd"}, regions=("eu", "ap"))
    result = place(request, nodes)
    assert isinstance(result, Placement) and result.node_id == "a"
    result = place(Request(resources=Resources(), regions=("ap",)), nodes)
    assert isinstance(result, Unschedulable)


def test_a_minimum_tier_is_met_by_any_stronger_runtime() -> None:
    nodes = [
        node("weak", runtimes=frozenset({Tier.PROCESS, Tier.NAMESPACE})),
        node("strong", cpu=100, runtimes=frozenset({Tier.GVISOR})),
        node("middle", cpu=200, runtimes=frozenset({Tier.OCI})),
    ]
    request = Request(resources=Resources(cpu_millicores=100), min_isolation=Tier.OCI)
    result = place(request, nodes)
    assert isinstance(result, Placement) and result.node_id == "middle"
    assert result.rejected == {"without a runtime of at least oci": 1}
    assert place(Request(resources=Resources(), min_isolation=Tier.MICROVM), nodes) == (
        Unschedulable({"without a runtime of at least microvm": 3})
    )


node_views = st.builds(
    lambda i, cpu, mem, ready, tiers: node(
        f"n{i}", cpu=cpu, mem=mem, ready=ready, runtimes=frozenset(tiers)
    ),
    st.integers(0, 50),
    st.integers(0, 4000),
    st.integers(0, 8192),
    st.booleans(),
    st.sets(st.sampled_from(list(Tier)), min_size=1),
)


@given(
    st.lists(node_views, max_size=12, unique_by=lambda n: n.id),
    st.integers(1, 4000),
    st.integers(1, 8192),
    st.none() | st.sampled_from(list(Tier)),
)
def test_placement_never_violates_a_hard_constraint(
    nodes: list[NodeView], cpu: int, mem: int, tier: Tier | None
) -> None:
    request = Request(resources=Resources(cpu_millicores=cpu, memory_mib=mem), isolation=tier)
    result = place(request, nodes)
    feasible = [
        n
        for n in nodes
        if n.ready
        and n.free.cpu_millicores >= cpu
        and n.free.memory_mib >= mem
        and (tier is None or tier in n.runtimes)
    ]
    if not feasible:
        assert isinstance(result, Unschedulable)
        assert sum(result.rejected.values()) == len(nodes)
        return
    assert isinstance(result, Placement)
    chosen = next(n for n in feasible if n.id == result.node_id)

    # least loaded: no feasible node has a strictly larger free share
    def share(n: NodeView) -> float:
        return (n.free.cpu_millicores / 4000 + n.free.memory_mib / 8192) / 2

    assert all(share(chosen) >= share(n) for n in feasible)
