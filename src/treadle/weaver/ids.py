"""Identifiers: a prefix plus a time-ordered 26-character ULID, so ids sort by creation."""

from __future__ import annotations

import itertools
import os
import secrets
import time

__all__ = [
    "BATCH",
    "EVENT",
    "EXECUTION",
    "SANDBOX",
    "first_id_at",
    "new_id",
    "new_secret",
    "new_serial",
]

# The prefixes of the ids of what is kept by id and read back in id order (listing cursors,
# retention): whoever makes, reads or compares one uses these.
EXECUTION = "ex"
SANDBOX = "sbx"
BATCH = "bt"
EVENT = "ev"

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
# Two characters at a time: 13 lookups make the 26.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_SHIFTS = range(120, -1, -10)
# Random bytes read from the kernel a page at a time, not with a system call per id: every
# execution takes several ids (its own, its events'). Ids are not secrets (`new_secret` is).
_POOL_BYTES = 4096
_pool = b""
_taken = _POOL_BYTES


def new_id(prefix: str, at: float | None = None) -> str:
    """A new id, made now (or, for tests and imports, at `at`, Unix seconds)."""
    global _pool, _taken
    if _taken + 10 > len(_pool):
        _pool, _taken = os.urandom(_POOL_BYTES), 0
    noise = int.from_bytes(_pool[_taken : _taken + 10], "big")
    _taken += 10
    ms = time.time_ns() // 1_000_000 if at is None else int(at * 1000)
    return _encode(prefix, ms << 80 | noise)


def first_id_at(prefix: str, at: float) -> str:
    """The least id `new_id(prefix)` can make at `at` (Unix seconds): every id made
    before then sorts below it (before 1970, none)."""
    return _encode(prefix, max(0, int(at * 1000)) << 80)


def _encode(prefix: str, value: int) -> str:
    return prefix + "_" + "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


# What tells this process's serials from every other process's: random, drawn once.
_PROCESS = new_id("p")[-12:]
_SERIALS = itertools.count()


def new_serial(prefix: str) -> str:
    """An id unique among all processes' but not time-ordered: for what is published and
    never stored (notifications), where an id only serves to drop a repeat."""
    return f"{prefix}_{_PROCESS}{next(_SERIALS):x}"
