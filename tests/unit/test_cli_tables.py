"""The formatters behind `ps`, `fn list` and `nodes`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from treadle.cli.tables import format_age, format_duration

NOW = datetime(2025, 1, 2, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("stamp", "age"),
    [
        ("2025-01-02T11:59:18Z", "42s"),
        ("2025-01-02T11:55:00+00:00", "5m"),
        ("2025-01-02T09:00:00", "3h"),  # no offset: read as UTC
        ("2024-12-31T12:00:00Z", "2d"),
        ("2025-01-02T12:00:05Z", "0s"),  # a clock slightly ahead is not a negative age
        (None, "-"),
        ("yesterday", "-"),
    ],
)
def test_format_age(stamp: str | None, age: str) -> None:
    assert format_age(stamp, NOW) == age


@pytest.mark.parametrize(
    ("ms", "text"),
    [(4.1, "4.1ms"), (2350, "2.35s"), (187_000, "3m07s"), (None, "-"), (True, "-")],
)
def test_format_duration(ms: float | None, text: str) -> None:
    assert format_duration(ms) == text
