"""Reconnect delays: exponential with jitter, so a fleet that lost Weaver does not come back
in one synchronized stampede."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays `base, 2·base, 4·base, …` capped at `cap`, each scaled by a random factor in
    [0.5, 1) ("equal jitter": never shorter than half the nominal delay)."""

    def __init__(
        self, base: float = 0.1, cap: float = 5.0, *, rng: Callable[[], float] = random.random
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self._rng = rng
        self._failures = 0

    def next(self) -> float:
        nominal = min(self.cap, self.base * 2 ** min(self._failures, 62))
        self._failures += 1
        return self._jitter(nominal)

    def longest(self) -> float:
        """The capped delay, for failures that retrying soon cannot fix (a refused credential)."""
        self._failures += 1
        return self._jitter(self.cap)

    def reset(self) -> None:
        self._failures = 0

    def _jitter(self, nominal: float) -> float:
        return nominal * (0.5 + self._rng() / 2)
