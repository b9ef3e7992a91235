"""The one exception root of treadle.

TreadleError
 ├── InvalidRequest      (422)  a request names something impossible; `details` says what
 │    └── PayloadTooLarge (413) a body, args or stdin over its configured limit
 ├── Unauthenticated     (401)  missing or unknown credential
 ├── Forbidden           (403)  credential lacks the scope for this action
 ├── NotFound            (404)  no such resource for this tenant (also: another tenant's)
 ├── Conflict            (409)  the resource is in a state where the action is not allowed
 │    └── InvalidTransition      an execution event that is not valid in its current state
 ├── LimitExceeded       (429)  a per-tenant limit is reached; `details` names it
 ├── InsufficientStorage (507)  a sandbox's disk quota is full; `details` names it
 ├── Unavailable         (503)  cannot be done by this replica now; retrying is safe
 └── ProtocolError               a Weaver/Shuttle frame that is not part of the protocol

Each carries a stable machine-readable `code`; the API maps the class to its HTTP status.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadGateway",
    "Conflict",
    "Forbidden",
    "InsufficientStorage",
    "InvalidRequest",
    "InvalidTransition",
    "LimitExceeded",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "TreadleError",
    "Unauthenticated",
    "Unavailable",
]


class TreadleError(Exception):
    code = "error"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class InvalidRequest(TreadleError):
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class Unauthenticated(TreadleError):
    code = "unauthenticated"


class Forbidden(TreadleError):
    code = "forbidden"


class NotFound(TreadleError):
    code = "not_found"


class Conflict(TreadleError):
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class InsufficientStorage(TreadleError):
    code = "insufficient_storage"


class LimitExceeded(TreadleError):
    code = "limit_exceeded"


class Unavailable(TreadleError):
    code = "unavailable"


class BadGateway(TreadleError):
    """What a sandbox's port answered (or did not) is not an HTTP answer."""

    code = "bad_gateway"


class ProtocolError(TreadleError):
    code = "protocol_error"
