"""Node speeds move towards what the programs they run show."""

from __future__ import annotations

from treadle.weaver.services.speed import SpeedObserver


def test_a_node_slower_than_it_claimed_loses_speed_and_a_true_one_keeps_it() -> None:
    observer = SpeedObserver()
    honest, boaster = 1.0, 2.0
    # The same function takes 1,000 ms of CPU on both: the boaster is no faster.
    for _ in range(60):
        honest = observer.sample(("tn", "fn", 1), 1000.0, honest)
        boaster = observer.sample(("tn", "fn", 1), 1000.0, boaster)
    assert abs(boaster - honest) < 0.05
    assert 1.0 < boaster < 2.0 and 1.0 <= honest < 2.0


def test_a_node_twice_as_fast_ends_near_twice_the_speed() -> None:
    observer = SpeedObserver()
    slow, fast = 1.0, 1.0
    for _ in range(100):
        slow = observer.sample("fn", 1000.0, slow)
        fast = observer.sample("fn", 500.0, fast)
    assert 1.7 < fast / slow < 2.3


def test_short_runs_and_first_runs_change_nothing() -> None:
    observer = SpeedObserver()
    assert observer.sample("fn", 10.0, 1.5) == 1.5
    assert observer.sample("fn", None, 1.5) == 1.5
    assert observer.sample("fn", 900.0, 1.5) == 1.5  # the first run only sizes the work
    assert observer.sample("other", 900.0, 1.5) == 1.5
