"""What the next attempt's placement keeps from the attempt lost before it."""

from __future__ import annotations

from treadle.weaver.services.reports import retry_placement


def test_a_lost_attempt_adds_its_node_and_keeps_the_invoked_strategy() -> None:
    decided = {
        "node_id": "nd_a",
        "requested_strategy": "lowest_cost",
        "region": "eu",
        "spot": False,
    }
    assert retry_placement(decided, "nd_a") == {
        "requested_strategy": "lowest_cost",
        "avoid_nodes": ["nd_a"],
    }


def test_a_reclaimed_spot_node_also_rules_out_its_region() -> None:
    first = retry_placement({"region": "eu", "spot": True}, "nd_a")
    assert first == {"avoid_nodes": ["nd_a"], "avoid_regions": ["eu"]}
    second = retry_placement({**(first or {}), "region": "us", "spot": True}, "nd_b")
    assert second == {"avoid_nodes": ["nd_a", "nd_b"], "avoid_regions": ["eu", "us"]}


def test_work_put_back_unstarted_keeps_only_what_it_had() -> None:
    assert retry_placement({"node_id": "nd_a", "score": 1.0}, None) is None
    assert retry_placement(None, "nd_a") is None
