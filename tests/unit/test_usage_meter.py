"""A workload's usage records from its cgroup's counters (`treadle.shuttle.gauge.meter`):
the differences of cumulative counters, numbered, meeting end to start, with the time it was
paused counted from the pause and the resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.shuttle.gauge import meter as meter_module
from treadle.shuttle.gauge.meter import ZERO, Meter
from treadle.shuttle.gpus import GpuUse, GpuUseReader, parse_use
from treadle.shuttle.runtimes.slirp import interface_bytes
from treadle.shuttle.sandbox import cgroups
from treadle.shuttle.sandbox.cgroups import GroupUsage

MIB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(meter_module.time, "time", fake)
    return fake


def at(cpu_s: float, memory_mib: int) -> GroupUsage:
    return GroupUsage(cpu_ns=int(cpu_s * 1e9), memory_bytes=memory_mib * MIB)


def test_records_are_the_differences_and_add_up(clock: Clock) -> None:
    meter = Meter("sandbox", "sbx_1", 2)
    meter.start(at(5.0, 100))  # what it had used before it ran is not its
    clock.now += 10
    first = meter.sample(at(6.5, 300))
    clock.now += 5
    last = meter.sample(at(7.0, 100), final=True)
    assert (first.seq, last.seq, last.final) == (1, 2, True)
    assert (first.start, first.end, last.start, last.end) == (1000, 1010, 1010, 1015)
    assert (first.cpu_s, last.cpu_s) == pytest.approx((1.5, 0.5))
    assert (first.memory_peak_mib, last.memory_peak_mib) == (300, 300)
    # GiB-seconds: the mean of each interval's ends, over its length
    assert first.memory_gib_s == pytest.approx((100 + 300) / 2 / 1024 * 10)
    assert (first.generation, first.kind) == (2, "sandbox")


def test_paused_time_counts_from_the_pause_to_the_resume(clock: Clock) -> None:
    meter = Meter("sandbox", "sbx_1", 1)
    meter.start(at(0, 10))
    clock.now += 2
    meter.pause()
    clock.now += 3
    record = meter.sample(at(0, 10))  # still paused: 3 of its 5 seconds
    assert (record.wall_s, record.paused_s) == (5, 3)
    clock.now += 4
    meter.resume()
    clock.now += 1
    record = meter.sample(at(0, 10))
    assert (record.wall_s, record.paused_s) == (5, 4)


def test_a_counter_that_goes_back_or_is_not_there_counts_nothing(clock: Clock) -> None:
    meter = Meter("sandbox", "sbx_1", 1)
    meter.start(None)
    clock.now += 1
    assert meter.sample(None).cpu_s == 0.0  # a tier with no cgroup to read
    clock.now += 1
    meter.sample(at(9.0, 1))
    clock.now += 1
    assert meter.sample(at(1.0, 1)).cpu_s == 0.0  # a new cgroup, say: never negative


def test_disk_and_network_are_the_rise_of_their_counters_from_zero(clock: Clock) -> None:
    meter = Meter("execution", "exe_1", 1)
    meter.start(ZERO)
    clock.now += 1
    first = meter.sample(
        GroupUsage(disk_read_bytes=4096, disk_write_bytes=0, net_in_bytes=10, net_out_bytes=20)
    )
    clock.now += 1
    # The network gone (its namespace ended with the workload): its last read stands.
    last = meter.sample(GroupUsage(disk_read_bytes=8192, disk_write_bytes=512), final=True)
    assert (first.disk_read_bytes, first.net_in_bytes, first.net_out_bytes) == (4096, 10, 20)
    assert (last.disk_read_bytes, last.disk_write_bytes) == (4096, 512)
    assert (last.net_in_bytes, last.net_out_bytes) == (0, 0)


def test_group_usage_reads_disk_counters_of_either_cgroup_version(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "io.stat").write_text(
        "254:0 rbytes=4096 wbytes=512 rios=1 wios=1 dbytes=0 dios=0\n"
        "8:16 rbytes=100 wbytes=7 rios=1 wios=1 dbytes=0 dios=0\n"
    )
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "blkio.throttle.io_service_bytes_recursive").write_text(
        "254:0 Read 4096\n254:0 Write 512\n254:0 Sync 512\n254:0 Async 0\n"
        "254:0 Discard 0\n254:0 Total 4608\n8:16 Read 100\n8:16 Write 7\nTotal 4715\n"
    )
    assert cgroups._io_stat(v2) == (4196, 519)
    assert cgroups._blkio(v1) == (4196, 519)
    assert cgroups._io_stat(tmp_path / "absent") is None


def test_network_bytes_leave_out_loopback() -> None:
    net_dev = (
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
        "    lo: 900 9 0 0 0 0 0 0 900 9 0 0 0 0 0 0\n"
        "  tap0: 1500 3 0 0 0 0 0 0 2500 4 0 0 0 0 0 0\n"
    )
    assert interface_bytes(net_dev) == (1500, 2500)


def test_gpu_use_is_read_from_nvidia_smi_and_what_it_cannot_give_is_zero() -> None:
    out = (
        "GPU-a, 37, 2048\n"
        "GPU-b, [N/A], [N/A]\n"
        "GPU-c, nan, inf\n"
        "GPU-d, 250, -5\n"
        "not a line\n"
        ", 10, 10\n"
    )
    assert parse_use(out) == {
        "GPU-a": (0.37, 2048.0),
        "GPU-b": (0.0, 0.0),
        "GPU-c": (0.0, 0.0),
        "GPU-d": (1.0, 0.0),
    }
    # Simulated devices are never read: they do not exist.
    assert GpuUseReader(smi="/nonexistent").read(["GPU-simulated-0"]) is None


def test_gpu_seconds_are_how_busy_its_devices_are_over_the_time_it_ran(clock: Clock) -> None:
    meter = Meter("execution", "exe_1", 1)
    meter.start(ZERO)
    clock.now += 2
    meter.pause()
    clock.now += 2
    record = meter.sample(None, gpus=GpuUse(busy=1.5, memory_mib=512))
    assert (record.gpu_s, record.gpu_memory_peak_mib) == (3.0, 512)  # 2 s running
    assert meter.sample(None).gpu_s == 0
