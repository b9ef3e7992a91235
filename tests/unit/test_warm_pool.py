"""The warm pool's bookkeeping, without VMs: what a start of each shape finds, and how many
shapes the pool keeps track of (its boots are `tests/microvm/test_pool.py`'s)."""

from __future__ import annotations

from pathlib import Path

from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.live.pool import MAX_SHAPES, WarmPool
from treadle.shuttle.microvm.launcher import MicrovmLauncher


class Shapes:
    """What the pool asks of its launcher to keep books (it boots nothing here: no count)."""

    shape = staticmethod(MicrovmLauncher.shape)
    footprint_mib = staticmethod(MicrovmLauncher.footprint_mib)


def assign(memory_mib: int, tenant: str = "tn_1") -> AssignSpec:
    return AssignSpec(
        id=f"sbx_{memory_mib}",
        attempt=1,
        tenant_id=tenant,
        function="sandbox",
        version=1,
        argv=["python3", "-c", "agent"],
        env={"SECRET": tenant},
        timeout_s=60,
        resources=Resources(cpu_millicores=1000, memory_mib=memory_mib),
        isolation=Tier.MICROVM,
    )


async def test_a_tenant_s_many_sizes_keep_the_pool_s_books_bounded(tmp_path: Path) -> None:
    pool = WarmPool(Shapes(), per_shape=0, budget_mib=1 << 20, workdir=tmp_path)  # type: ignore[arg-type]
    try:
        for memory in range(256, 256 + MAX_SHAPES + 10):
            assert pool.take(assign(memory), []) is None
        stats = pool.stats()
        assert (stats.misses, stats.shapes, stats.ready, stats.booting) == (
            MAX_SHAPES + 10,
            MAX_SHAPES,
            0,
            0,
        )
        # The same shape for another tenant is the same shape: its env is not part of it.
        pool.take(assign(256 + MAX_SHAPES + 9, tenant="tn_2"), [])
        assert pool.stats().shapes == MAX_SHAPES
    finally:
        await pool.close()
