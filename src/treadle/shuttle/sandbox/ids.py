"""Who a sandboxed program is, inside its sandbox and on the host.

Inside every sandbox of every tier the program runs as uid and gid `SANDBOX_UID` (1000, user
`user` in the sandbox's /etc/passwd), in a user namespace of its own, without capabilities.

On the host that identity must never be a privileged one: a program whose host uid is 0 reads
every root-owned file it can see and every /proc entry only root may read, capabilities or
not. So where Shuttle runs as root, each workload gets a range of subordinate ids of its own
(`IdPool`, from the Shuttle's `sandbox_ids_base`, `SLOT_SIZE` ids per workload): sandbox id N
is host id `start + N`, and no two workloads running at once share a host uid, so neither
per-user limits (RLIMIT_NPROC) nor signals can pass between them. Give each Shuttle on a host
a base of its own. Where Shuttle runs unprivileged, the kernel lets it map only its own ids:
the sandbox's 1000 is then Shuttle's uid, as unprivileged as Shuttle itself.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_SLOTS",
    "MAX_BASE",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "SLOT_SIZE",
    "IdPool",
    "IdRange",
    "host_ids",
    "pool_for",
]

SANDBOX_UID = 1000
SANDBOX_GID = 1000
SLOT_SIZE = 65_536
DEFAULT_BASE = 100_000
DEFAULT_SLOTS = 1024
# The kernel's ids are 32-bit and (uid_t)-1 means "no change": stay well below.
_ID_LIMIT = 2**31
# The highest base whose ranges all fit.
MAX_BASE = _ID_LIMIT - DEFAULT_SLOTS * SLOT_SIZE


@dataclass(frozen=True, slots=True)
class IdRange:
    """Sandbox ids [0, size) are host ids [start, start + size)."""

    start: int
    size: int = SLOT_SIZE

    def host(self, sandbox_id: int) -> int:
        if not 0 <= sandbox_id < self.size:
            raise ValueError(f"id {sandbox_id} is outside the sandbox's range")
        return self.start + sandbox_id


class IdPool:
    """Ranges of host ids, one per running workload (thread-safe: cleanup threads give
    ranges back)."""

    def __init__(self, base: int, slots: int, size: int = SLOT_SIZE) -> None:
        if base < 1 or slots < 1 or base + slots * size > _ID_LIMIT:
            raise ValueError(f"no room for {slots} ranges of {size} ids from {base}")
        self._base = base
        self._size = size
        self._slots = slots
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self) -> IdRange | None:
        """A free range; None when every one is in use."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        return IdRange(self._base + slot * self._size, self._size)

    def claim(self) -> IdRange:
        """A free range; OSError (EAGAIN) when every one is in use, which fails the start
        of the workload that asked."""
        ids = self.take()
        if ids is None:
            raise OSError(errno.EAGAIN, "every sandbox id range of this node is in use")
        return ids

    def give_back(self, ids: IdRange) -> None:
        slot = (ids.start - self._base) // self._size
        with self._lock:
            if slot not in self._free:
                self._free.append(slot)

    def in_use(self) -> int:
        with self._lock:
            return self._slots - len(self._free)


def host_ids() -> tuple[int, int] | None:
    """Shuttle's own (uid, gid) where it runs unprivileged and so can map only those; None
    where it runs as root and gives each workload subordinate ids."""
    if os.geteuid() == 0:
        return None
    return os.getuid(), os.getgid()


_pools: dict[tuple[int, int], IdPool] = {}
_pools_lock = threading.Lock()


def pool_for(base: int, slots: int = DEFAULT_SLOTS) -> IdPool | None:
    """The id ranges of this Shuttle's workloads, one pool per base shared by every tier;
    None where Shuttle runs unprivileged (see `host_ids`)."""
    if host_ids() is not None:
        return None
    with _pools_lock:
        pool = _pools.get((base, slots))
        if pool is None:
            pool = _pools[(base, slots)] = IdPool(base, slots)
        return pool
