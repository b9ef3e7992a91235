"""Opaque list cursors: the id of the last row of a page, which must carry the listed kind's
prefix when it comes back."""

from __future__ import annotations

import base64

from treadle.domain.errors import InvalidRequest

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(row_id: str) -> str:
    return base64.urlsafe_b64encode(row_id.encode()).decode()


def decode_cursor(cursor: str, prefix: str) -> str:
    """The id `cursor` stands for; 422 when it is not a cursor of ids starting `prefix_`."""
    try:
        value = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        value = ""
    if not value.startswith(f"{prefix}_"):
        raise InvalidRequest(
            "cursor is not one this API returned",
            details=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        )
    return value
