"""E2B-shaped errors, `{"code": <status>, "message": <text>}`, for the E2B routes only: the
app-wide handlers keep treadle's own shape for the rest of the API, so the E2B routes use a
route class that answers their errors itself (and, for the control plane, authenticates
before anything of the body is read, as `limits.RequestGuard` does for `/v1/`).

The SDK maps statuses to its exceptions and retries 429/502/503/504 unless
told `Should-Retry: false`; only what is safe to repeat is left retryable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from treadle.domain import errors
from treadle.weaver.api.deps import PRINCIPAL, bearer, get_weaver
from treadle.weaver.api.errors import status_for

__all__ = ["E2B_PATH", "E2BAuthedRoute", "E2BRoute", "e2b_error"]

# The paths of E2B's control plane, whose errors, wherever made, are in E2B's shape.
E2B_PATH = re.compile(r"^/(?:v2/)?sandboxes(?:/|$)")

log = logging.getLogger(__name__)

# A tenant's limit does not lift by itself within the SDK's retries.
_NO_RETRY = {"Should-Retry": "false"}
_HEADERS: dict[int, Mapping[str, str]] = {
    429: _NO_RETRY,
    503: {"Retry-After": "1"},  # `Unavailable` is documented as safe to retry
    502: _NO_RETRY,
}

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def e2b_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"code": status, "message": message},
        status_code=status,
        headers=dict(headers or _HEADERS.get(status, {})),
    )


def _validation_message(problems: list[Any]) -> str:
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    what = first.get("msg", "invalid request")
    return f"{where}: {what}" if where else str(what)


def _answer(exc: Exception) -> Response:
    if isinstance(exc, errors.TreadleError):
        # treadle's statuses, but for bad input: E2B says 400 where treadle says 422.
        status = status_for(exc)
        status = 400 if status == 422 else status
        return e2b_error(status, exc.message)
    if isinstance(exc, RequestValidationError | ValidationError):
        return e2b_error(400, _validation_message(list(exc.errors())))
    if isinstance(exc, HTTPException):
        return e2b_error(exc.status_code, str(exc.detail))
    log.exception("unhandled error on an E2B route", exc_info=exc)
    return e2b_error(500, "internal error", _NO_RETRY)


class E2BRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def answered(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return _answer(exc)

        return answered


class E2BAuthedRoute(E2BRoute):
    """The control plane: the SDK's `X-API-Key` (or treadle's bearer key) names the tenant."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def authenticated(request: Request) -> Response:
            key = request.headers.get("x-api-key") or bearer(request.headers)
            if not key:
                return e2b_error(401, "missing API key: send 'X-API-Key: <treadle API key>'")
            try:
                request.scope[PRINCIPAL] = await get_weaver(request).auth.authenticate(key)
            except Exception as exc:
                return _answer(exc)
            return await handler(request)

        return authenticated
