"""Sockets that only follow (an execution's output, a batch's results), counted per tenant on
this replica. Each holds a task and bus subscriptions for as long as its client keeps it
open; without a cap one tenant could hold any number of them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from treadle.domain.errors import LimitExceeded

__all__ = ["Followers"]


class Followers:
    def __init__(self, max_per_tenant: int) -> None:
        self._max_per_tenant = max_per_tenant
        self._open: Counter[str] = Counter()

    @contextmanager
    def held(self, tenant_id: str) -> Iterator[None]:
        """One more of the tenant's, while within; LimitExceeded past the cap."""
        if self._open[tenant_id] >= self._max_per_tenant:
            raise LimitExceeded(
                f"this tenant has {self._open[tenant_id]} follow sockets open; the limit is "
                f"{self._max_per_tenant} (TREADLE_MAX_FOLLOWERS_PER_TENANT)",
                details={"limit": "max_followers_per_tenant", "value": self._max_per_tenant},
            )
        self._open[tenant_id] += 1
        try:
            yield
        finally:
            self._open[tenant_id] -= 1
            if not self._open[tenant_id]:
                del self._open[tenant_id]
