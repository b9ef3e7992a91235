"""Reading, from the host, the cgroups a Shuttle made for its workloads: their own counters,
to check what was metered against."""

from __future__ import annotations

from pathlib import Path

from treadle.shuttle.runtimes.namespace import cgroup_owner

__all__ = ["cpu_s", "groups_of"]


def _cpu_root() -> Path:
    """Where workloads' CPU is counted on this host: v1's cpuacct hierarchy or v2's."""
    v1 = Path("/sys/fs/cgroup/cpuacct/treadle")
    return v1 if v1.is_dir() else Path("/sys/fs/cgroup/treadle")


def groups_of(shuttle_home: Path) -> set[Path]:
    """The groups of the Shuttle with this home, now."""
    prefix = f"{cgroup_owner(shuttle_home)}."
    root = _cpu_root()
    return {entry for entry in root.iterdir() if entry.is_dir() and entry.name.startswith(prefix)}


def cpu_s(group: Path) -> float:
    """A group's own CPU counter, in seconds (v1's cpuacct.usage or v2's cpu.stat)."""
    if (group / "cpuacct.usage").exists():
        return int((group / "cpuacct.usage").read_text()) / 1e9
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6
