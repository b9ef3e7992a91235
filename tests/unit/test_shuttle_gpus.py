"""GPU type names and per-attempt device assignment."""

from __future__ import annotations

import pytest

from treadle.shuttle.gpus import Gpu, GpuPool, gpu_type


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla T4", "t4"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA RTX A6000", "rtxa6000"),
    ],
)
def test_gpu_type_is_the_short_model_name(name: str, expected: str) -> None:
    assert gpu_type(name) == expected


def _gpus(n: int) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-{i}", name="NVIDIA H100", memory_mib=81559) for i in range(n)]


def test_each_attempt_gets_its_own_devices_until_it_gives_them_back() -> None:
    pool = GpuPool(_gpus(3))
    first = pool.take(("a", 1), 2)
    assert first is not None and [g.index for g in first] == [0, 1]
    assert pool.take(("b", 1), 2) is None  # only one left
    second = pool.take(("b", 1), 1)
    assert second is not None and [g.index for g in second] == [2]
    pool.give_back(("a", 1))
    again = pool.take(("c", 1), 2)
    assert again is not None and [g.index for g in again] == [0, 1]


def test_no_gpu_means_none_visible() -> None:
    pool = GpuPool(_gpus(2))
    taken = pool.take(("a", 1), 0)
    assert taken == []
    assert GpuPool.env(taken) == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    assert GpuPool.env(_gpus(2)) == {
        "CUDA_VISIBLE_DEVICES": "GPU-0,GPU-1",
        "NVIDIA_VISIBLE_DEVICES": "GPU-0,GPU-1",
    }
