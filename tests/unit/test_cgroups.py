"""Cgroup detection, limit computation and counters, on mount tables and directory trees made
up for the test (the real hierarchies are exercised by tests/contract)."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.domain.resources import Resources
from treadle.shuttle.sandbox.cgroups import Group as CgroupGroup
from treadle.shuttle.sandbox.cgroups import (
    GroupUsage,
    Layout,
    Limits,
    block_devices,
    cgroup_roots,
    cpu_bandwidth,
    detect,
    limit_writes,
    parse_mountinfo,
)

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = """\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
"""


def mountinfo(entries: dict[str, tuple[str, str]]) -> str:
    """A mount table with, per mount point, (fstype, super options)."""
    return "".join(
        f"{i} 1 0:{i} / {point.replace(' ', chr(92) + '040')} rw - {fstype} {fstype} {options}\n"
        for i, (point, (fstype, options)) in enumerate(entries.items(), start=30)
    )


def test_limits_follow_the_functions_resources() -> None:
    limits = Limits.for_resources(Resources(cpu_millicores=250, memory_mib=64), pids_max=128)

    assert limits == Limits(
        memory_bytes=64 << 20, cpu_quota_us=25_000, pids_max=128, io_devices=block_devices()
    )


def test_disks_get_a_rule_that_counts_their_io_without_limiting_it() -> None:
    writes = limit_writes(1, Limits(io_devices=("254:0", "8:16")))
    assert writes["blkio"] == [
        ("blkio.throttle.read_bps_device", f"254:0 {2**60}"),
        ("blkio.throttle.write_bps_device", f"254:0 {2**60}"),
        ("blkio.throttle.read_bps_device", f"8:16 {2**60}"),
        ("blkio.throttle.write_bps_device", f"8:16 {2**60}"),
    ]
    assert "blkio" not in limit_writes(1, Limits())


def test_a_tiny_cpu_share_gets_the_smallest_quota_the_kernel_takes() -> None:
    assert Limits.for_resources(Resources(cpu_millicores=1), None).cpu_quota_us == 1_000
    assert Limits.for_resources(Resources(cpu_millicores=2500), None).cpu_quota_us == 250_000


@pytest.mark.parametrize("millicores", [1, 3, 10, 50, 199, 200, 250, 1000, 2500, 64_000])
def test_a_cpu_share_is_the_same_whatever_its_period(millicores: int) -> None:
    quota, period = cpu_bandwidth(millicores)

    assert 100_000 <= period <= 1_000_000  # what the kernel takes
    assert quota >= 1_000
    if quota > 1_000:  # above the kernel's smallest quota the share is exact to a microsecond
        assert abs(quota * 1000 / period - millicores) <= 1000 / period


def test_a_small_cpu_share_comes_in_slices_long_enough_to_start_a_sandbox() -> None:
    # 10 millicores over 100 ms would be a 1 ms slice: less than a sandbox's own set-up,
    # which then waited a whole period before the program ran.
    assert cpu_bandwidth(10) == (10_000, 1_000_000)
    assert cpu_bandwidth(100) == (20_000, 200_000)
    assert cpu_bandwidth(200) == (20_000, 100_000)
    assert cpu_bandwidth(1000) == (100_000, 100_000)
    limits = Limits.for_resources(Resources(cpu_millicores=10), None)
    assert limit_writes(1, limits)["cpu"] == [
        ("cpu.cfs_period_us", "1000000"),
        ("cpu.cfs_quota_us", "10000"),
    ]
    assert limit_writes(2, limits)["cpu"] == [("cpu.max", "10000 1000000")]


def test_v1_limit_files() -> None:
    writes = limit_writes(1, Limits(memory_bytes=64 << 20, cpu_quota_us=25_000, pids_max=128))

    assert writes == {
        "memory": [
            ("memory.limit_in_bytes", "67108864"),
            ("memory.memsw.limit_in_bytes", "67108864"),
        ],
        "cpu": [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "25000")],
        "pids": [("pids.max", "128")],
    }


def test_v2_limit_files() -> None:
    writes = limit_writes(2, Limits(memory_bytes=64 << 20, cpu_quota_us=25_000, pids_max=128))

    assert writes == {
        "memory": [("memory.max", "67108864"), ("memory.swap.max", "0")],
        "cpu": [("cpu.max", "25000 100000")],
        "pids": [("pids.max", "128")],
    }
    assert limit_writes(2, Limits()) == {}


def test_mountinfo_of_a_hybrid_host() -> None:
    unified, v1 = parse_mountinfo(HYBRID)

    assert unified == Path("/sys/fs/cgroup/unified")
    assert v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu"),
        "cpuacct": Path("/sys/fs/cgroup/cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }


def test_mountinfo_with_comounted_controllers_and_escaped_paths() -> None:
    text = mountinfo(
        {"/cg/cpu,cpuacct": ("cgroup", "rw,cpu,cpuacct"), "/cg/a b": ("cgroup2", "rw")}
    )

    unified, v1 = parse_mountinfo(text + UNIFIED)

    assert unified == Path("/cg/a b")  # the first cgroup2 mount
    assert v1 == {"cpu": Path("/cg/cpu,cpuacct"), "cpuacct": Path("/cg/cpu,cpuacct")}


def test_v2_is_used_when_it_has_the_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")

    layout, _ = detect(mountinfo({str(tmp_path): ("cgroup2", "rw")}))

    assert layout == Layout(2, dict.fromkeys(["memory", "pids", "cpu", "io"], tmp_path / "treadle"))


def test_v1_is_used_when_the_unified_hierarchy_lacks_controllers(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    for name in ("memory", "pids", "cpu"):
        (tmp_path / name).mkdir()
    table = mountinfo(
        {
            str(tmp_path / "memory"): ("cgroup", "rw,memory"),
            str(tmp_path / "pids"): ("cgroup", "rw,pids"),
            str(tmp_path / "cpu"): ("cgroup", "rw,cpu"),
            str(unified): ("cgroup2", "rw"),
        }
    )

    layout, found = detect(table)

    assert layout == Layout(
        1,
        {name: tmp_path / name / "treadle" for name in ("memory", "pids", "cpu")},
    )
    assert found == "cgroup v1 (cpu, memory, pids)"


def test_no_cgroups_means_no_layout() -> None:
    layout, found = detect(mountinfo({"/": ("ext4", "rw")}))

    assert layout is None
    assert found == "no cgroup file system is mounted"


def test_a_group_has_one_directory_per_hierarchy(tmp_path: Path) -> None:
    shared = tmp_path / "cpu,cpuacct" / "treadle"
    layout = Layout(
        1,
        {"memory": tmp_path / "memory" / "treadle", "cpu": shared, "cpuacct": shared},
    )

    group = CgroupGroup(layout, "abc.1.0")

    assert group.dirs == [shared / "abc.1.0", tmp_path / "memory" / "treadle" / "abc.1.0"]
    with pytest.raises(ValueError):
        CgroupGroup(layout, "../escape")


def test_v1_counters(tmp_path: Path) -> None:
    layout = Layout(1, {c: tmp_path / c for c in ("memory", "pids", "cpuacct")})
    files = {
        "memory/g/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        "memory/g/memory.max_usage_in_bytes": "67108864\n",
        "pids/g/pids.events": "max 5\n",
        "cpuacct/g/cpuacct.usage": "74519492\n",
    }
    write_tree(tmp_path, files)

    usage = CgroupGroup(layout, "g").usage()

    assert usage == GroupUsage(oom_kills=2, pids_denied=5, cpu_ns=74_519_492, peak_bytes=64 << 20)


def test_v2_counters(tmp_path: Path) -> None:
    layout = Layout(2, dict.fromkeys(("memory", "pids", "cpu"), tmp_path))
    files = {
        "g/memory.events": "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n",
        "g/memory.peak": "1048576\n",
        "g/pids.events": "max 0\n",
        "g/cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
    }
    write_tree(tmp_path, files)

    usage = CgroupGroup(layout, "g").usage()

    assert usage == GroupUsage(oom_kills=1, pids_denied=0, cpu_ns=1_500_000, peak_bytes=1 << 20)


def test_counters_missing_on_older_kernels_are_unknown(tmp_path: Path) -> None:
    layout = Layout(2, dict.fromkeys(("memory", "pids"), tmp_path))
    (tmp_path / "g").mkdir()

    assert CgroupGroup(layout, "g").usage() == GroupUsage()


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_group_made_by_a_tool_is_found_in_every_hierarchy(tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in ("memory", "pids", "cpuacct", "devices")}
    table = mountinfo(
        {
            str(roots["memory"]): ("cgroup", "rw,memory"),
            str(roots["pids"]): ("cgroup", "rw,pids"),
            str(roots["cpuacct"]): ("cgroup", "rw,cpuacct"),
            str(roots["devices"]): ("cgroup", "rw,devices"),  # counted nowhere, removed too
            str(tmp_path / "unified"): ("cgroup2", "rw"),
        }
    )
    write_tree(
        tmp_path,
        {
            "memory/treadle/me/c1/memory.oom_control": "oom_kill 1\n",
            "memory/treadle/me/c1/memory.max_usage_in_bytes": "4096\n",
            "pids/treadle/me/c1/pids.events": "max 2\n",
            "cpuacct/treadle/me/c1/cpuacct.usage": "1000\n",
        },
    )
    (roots["devices"] / "treadle" / "me" / "c1" / "sub").mkdir(parents=True)

    group = CgroupGroup.at("/treadle/me/c1", table)

    assert group.dirs == sorted(root / "treadle/me/c1" for root in roots.values())
    assert group.usage() == GroupUsage(oom_kills=1, pids_denied=2, cpu_ns=1000, peak_bytes=4096)
    for path in ("..", "/treadle/../etc", "", "/"):
        with pytest.raises(ValueError):
            CgroupGroup.at(path, table)


def test_cgroup_roots_are_every_hierarchy() -> None:
    assert cgroup_roots(HYBRID) == [
        Path(f"/sys/fs/cgroup/{name}")
        for name in ("cpu", "cpuacct", "memory", "pids", "systemd", "unified")
    ]


def test_usage_since_an_earlier_read_counts_only_what_came_after() -> None:
    """A warm VM's counters start at its hand-over: running totals less theirs then; what
    is held, and the peak, as they are; a total not read then is taken whole."""
    boot = GroupUsage(
        oom_kills=0,
        pids_denied=1,
        cpu_ns=2_000,
        peak_bytes=300,
        memory_bytes=250,
        disk_read_bytes=10,
        disk_write_bytes=None,
        net_in_bytes=5,
        net_out_bytes=7,
    )
    later = GroupUsage(
        oom_kills=1,
        pids_denied=1,
        cpu_ns=2_500,
        peak_bytes=400,
        memory_bytes=260,
        disk_read_bytes=15,
        disk_write_bytes=3,
        net_in_bytes=None,
        net_out_bytes=9,
    )
    assert later.since(boot) == GroupUsage(
        oom_kills=1,
        pids_denied=0,
        cpu_ns=500,
        peak_bytes=400,
        memory_bytes=260,
        disk_read_bytes=15 - 10,
        disk_write_bytes=3,
        net_in_bytes=None,
        net_out_bytes=2,
    )
