"""treadle's errors as Connect errors (the codes the e2b SDK maps to its exceptions), and the
one way an envd service finds its caller."""

from __future__ import annotations

from collections.abc import Mapping

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from treadle.domain import errors
from treadle.weaver.api.sandbox_errors import sandbox_error
from treadle.weaver.core import Weaver
from treadle.weaver.envd.access import Denied, EnvdCaller, authorize
from treadle.weaver.services.streams import Ended

__all__ = ["HTTP_STATUS", "caller_of", "connect_error", "failed"]

# Most specific first: the first class an error is an instance of decides.
_CODES: tuple[tuple[type[errors.TreadleError], Code], ...] = (
    (errors.InvalidTransition, Code.FAILED_PRECONDITION),
    (errors.Conflict, Code.ALREADY_EXISTS),
    (errors.NotFound, Code.NOT_FOUND),
    (errors.Unauthenticated, Code.UNAUTHENTICATED),
    (errors.Forbidden, Code.PERMISSION_DENIED),
    (errors.InsufficientStorage, Code.RESOURCE_EXHAUSTED),
    (errors.LimitExceeded, Code.RESOURCE_EXHAUSTED),
    (errors.Unavailable, Code.UNAVAILABLE),
    (errors.BadGateway, Code.UNAVAILABLE),
    (errors.InvalidRequest, Code.INVALID_ARGUMENT),
)
# What each Connect code is over plain HTTP (the Connect protocol's table).
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
}


def connect_error(exc: Exception) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, Denied):
        code = Code.UNAUTHENTICATED if exc.status == 401 else Code.INVALID_ARGUMENT
        return ConnectError(code, exc.message)
    if isinstance(exc, errors.TreadleError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                return ConnectError(code, str(exc))
        return ConnectError(Code.FAILED_PRECONDITION, str(exc))
    raise exc


def failed(ended: Ended, what: str) -> ConnectError:
    """The Connect error for a sandbox operation that ended with `ended.error`."""
    if ended.error is None:
        return ConnectError(Code.UNKNOWN, what)
    return connect_error(sandbox_error(ended, {}, otherwise=errors.InvalidTransition))


async def caller_of(weaver: Weaver, headers: Mapping[str, str]) -> EnvdCaller:
    try:
        return await authorize(weaver, headers)
    except Denied as exc:
        raise connect_error(exc) from None
