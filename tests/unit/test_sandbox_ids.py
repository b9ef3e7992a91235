"""Host ids of sandboxes: a range of its own per running workload."""

from __future__ import annotations

import pytest

from treadle.shuttle.sandbox.ids import SLOT_SIZE, IdPool, IdRange


def test_running_workloads_never_share_a_host_id() -> None:
    pool = IdPool(100_000, 3)

    taken = [pool.take() for _ in range(3)]

    assert None not in taken
    starts = sorted(r.start for r in taken if r is not None)
    assert starts == [100_000, 100_000 + SLOT_SIZE, 100_000 + 2 * SLOT_SIZE]
    assert pool.take() is None  # the limit, and one past it: no range is shared
    assert pool.in_use() == 3


def test_a_range_given_back_is_taken_again_once() -> None:
    pool = IdPool(100_000, 2)
    first = pool.take()
    assert first is not None

    pool.give_back(first)
    pool.give_back(first)  # twice: still one free range, not two

    assert pool.in_use() == 0
    assert pool.take() == first
    assert pool.take() is not None
    assert pool.take() is None


def test_sandbox_ids_map_inside_the_range_only() -> None:
    ids = IdRange(200_000)
    assert ids.host(0) == 200_000
    assert ids.host(1000) == 201_000
    with pytest.raises(ValueError):
        ids.host(SLOT_SIZE)
    with pytest.raises(ValueError):
        ids.host(-1)


@pytest.mark.parametrize(("base", "slots"), [(0, 1), (1, 0), (2**31 - SLOT_SIZE, 2)])
def test_a_pool_must_fit_the_kernels_ids(base: int, slots: int) -> None:
    with pytest.raises(ValueError):
        IdPool(base, slots)


def test_claiming_from_a_full_pool_fails_the_start_clearly() -> None:
    pool = IdPool(100_000, 1)
    pool.claim()

    with pytest.raises(OSError, match="every sandbox id range of this node is in use"):
        pool.claim()
