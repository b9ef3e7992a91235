"""envd's `GET /health`, routed by the `E2b-Sandbox-Id` header: what
`sbx.is_running()` asks. 204 while the sandbox runs; otherwise the 502 E2B's proxy answers,
which the SDK reads as "not running" (and, saying "was not found", as killed or timed out).

envd requests carry the sandbox's access token (`X-Access-Token`), not the API key. A
credential that does not open this sandbox is told it was not found, as for an unknown id:
whether a sandbox exists is not told to whoever holds nothing of it. Without the header this
is the control plane's own health check.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from treadle.domain.errors import InvalidTransition, NotFound
from treadle.domain.sandbox import Desired, SandboxStatus, check_takes_work
from treadle.weaver.api.deps import bearer, get_weaver
from treadle.weaver.api.e2b import views
from treadle.weaver.api.e2b.errors import E2BRoute, e2b_error
from treadle.weaver.services import port_access
from treadle.weaver.services.sandboxes import sandbox_view

__all__ = ["SANDBOX_HEADER", "router"]

SANDBOX_HEADER = "e2b-sandbox-id"

router = APIRouter(tags=["e2b"], route_class=E2BRoute)


def _not_running(value: str, why: str) -> Response:
    # The SDK would retry a 502 left unmarked.
    return e2b_error(502, f"The sandbox {value} {why}", {"Should-Retry": "false"})


@router.get("/health", summary="envd health (E2b-Sandbox-Id), or the API's", status_code=204)
async def health(request: Request) -> Response:
    value = request.headers.get(SANDBOX_HEADER)
    if value is None:
        return JSONResponse({"status": "ok"})
    token = request.headers.get("x-access-token")
    key = request.headers.get("x-api-key") or bearer(request.headers)
    if not token and not key:
        return e2b_error(401, "missing X-Access-Token: send the sandbox's envdAccessToken")
    weaver = get_weaver(request)
    tenant = None if key is None else (await weaver.auth.authenticate(key)).tenant_id
    try:
        row = await weaver.sandboxes.get(None, views.treadle_id(value))
    except NotFound:
        return _not_running(value, "was not found")
    if row.tenant_id != tenant and not port_access.valid_token(row.access_token, token):
        return _not_running(value, "was not found")
    row = await weaver.sandboxes.started(row)
    if views.state_of(sandbox_view(row)) is None:
        return _not_running(value, "was not found")
    try:
        check_takes_work(row.id, SandboxStatus(row.status), Desired(row.desired))
    except InvalidTransition:
        return _not_running(value, f"is {row.status} (to be {row.desired}), not running")
    return Response(status_code=204)
