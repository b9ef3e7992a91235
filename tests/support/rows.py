"""Rows as the store holds them, for tests of the store's own paths."""

from __future__ import annotations

from typing import Any

__all__ = ["execution_rows"]


def execution_rows(n: int) -> list[dict[str, Any]]:
    """`n` executions of tenant tn_1 as store code inserts them (ids ex_000, ex_001, …):
    text, JSON and NULLs of every kind a row holds."""
    return [
        {
            "id": f"ex_{i:03}",
            "tenant_id": "tn_1",
            "function": "f",
            "version": 1,
            "state": "open",
            "attempt": 1,
            "max_attempts": 2,
            "args": {"i": i, "text": "é\u2028\"'", "nested": [1, None, {"x": 1.5}]},
            "stdin": None if i % 2 else "in",
            "idempotency_key": None,
            "cancel_requested": False,
            "resources": {"cpu_millicores": 10},
            "isolation": None,
            "placement": None if i % 3 else {"requested_strategy": "balanced"},
            "created_at": 1.25 + i,
            "queued_at": 1.25 + i,
            "batch_id": "bt_1",
            "batch_index": i,
        }
        for i in range(n)
    ]
