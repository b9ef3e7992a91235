"""Exceptions raised by the SDK.

TreadleError                      (treadle.domain.errors: the root of every treadle exception)
 └── TreadleClientError           anything the SDK raises
      ├── TreadleAPIError         the API answered with a non-2xx status (or an unusable body)
      ├── TreadleConnectionError  the API could not be reached, or a stream broke off
      └── TreadleConfigError      connection settings are missing or unreadable

Catching `TreadleClientError` is enough for a program that only wants to report failures.
"""

from __future__ import annotations

from typing import Any

from treadle.domain.errors import TreadleError

__all__ = [
    "TreadleAPIError",
    "TreadleClientError",
    "TreadleConfigError",
    "TreadleConnectionError",
]


class TreadleClientError(TreadleError):
    code = "client_error"


class TreadleAPIError(TreadleClientError):
    """A non-2xx answer, built from the API's `{"error": {"code", "message", "details"}}` body.

    `status` is the HTTP status; `code` the stable machine-readable error code.
    """

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message, details=details, code=code)
        self.status = status

    def __repr__(self) -> str:
        return (
            f"TreadleAPIError(status={self.status}, code={self.code!r}, message={self.message!r})"
        )


class TreadleConnectionError(TreadleClientError):
    """The request never got an HTTP answer: refused, timed out, or the stream dropped."""

    code = "connection_error"

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class TreadleConfigError(TreadleClientError):
    code = "config_error"
