"""What a node holds, per attempt, from placement until it reports the exit."""

from __future__ import annotations

from treadle.domain.resources import Resources, Tier
from treadle.protocol import Hello
from treadle.weaver.services.nodes import NodeSession


def session() -> NodeSession:
    capacity = Resources(cpu_millicores=2000, memory_mib=1024)
    hello = Hello(protocol=1, name="n", capacity=capacity, runtimes=[Tier.PROCESS])
    return NodeSession(node_id="nd_1", hello=hello)


def test_a_second_reservation_of_the_same_attempt_holds_nothing_more() -> None:
    s = session()
    need = Resources(cpu_millicores=500, memory_mib=100)
    assert s.reserve(("ex_1", 1), need, "tn_a") is True
    assert s.reserve(("ex_1", 1), need, "tn_a") is False  # placed twice: the first still holds it
    assert s.allocated.cpu_millicores == 500
    assert s.view().free.cpu_millicores == 1500


def test_release_frees_exactly_once() -> None:
    s = session()
    s.reserve(("ex_1", 1), Resources(cpu_millicores=500, memory_mib=100), "tn_a")
    s.reserve(("ex_2", 1), Resources(cpu_millicores=700, memory_mib=100), "tn_b")
    assert s.release(("ex_1", 1)) is True
    assert s.release(("ex_1", 1)) is False
    assert (s.allocated.cpu_millicores, s.allocated.memory_mib) == (700, 100)


def test_placement_sees_the_observed_speed_and_reliability() -> None:
    capacity = Resources(cpu_millicores=1000, memory_mib=1024)
    hello = Hello(protocol=1, name="n", capacity=capacity, runtimes=[Tier.PROCESS], perf_score=3.0)
    s = NodeSession("nd_1", hello)
    assert s.view().perf_score == 3.0
    s.speed = 1.5
    for _ in range(3):
        s.observe(0.0)
    view = s.view()
    assert view.perf_score == 1.5
    assert abs(view.reliability - 0.9**3) < 1e-9


def test_reliability_climbs_back_to_exactly_one() -> None:
    s = session()
    s.observe(0.0)
    for _ in range(200):
        s.observe(1.0)
    assert s.reliability == 1.0
