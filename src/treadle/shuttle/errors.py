"""Errors that stop Shuttle: configuration it cannot work with, or a Weaver it cannot talk to."""

from __future__ import annotations

from treadle.domain.errors import TreadleError

__all__ = ["ShuttleError"]


class ShuttleError(TreadleError):
    """A condition Shuttle cannot recover from by retrying; the message tells the operator
    what to change (a flag, a credential, an upgrade)."""

    code = "shuttle_error"
