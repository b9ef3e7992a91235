"""E2B's control-plane routes, a thin translation onto treadle's sandboxes
(DESIGN §11): create (v1 and v2), get, list (v1 and v2), kill, timeout and refresh, pause,
connect and resume, metrics. Every route is the caller's tenant's: another tenant's sandbox,
like one that was killed, is not found.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, ValidationError

from treadle.domain.errors import InvalidRequest, InvalidTransition, NotFound, Unavailable
from treadle.domain.sandbox import (
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    Desired,
    ExpiryAction,
    SandboxSpec,
    SandboxStatus,
)
from treadle.domain.templates import resolve
from treadle.weaver.api.deps import PRINCIPAL, WeaverDep
from treadle.weaver.api.e2b import views
from treadle.weaver.api.e2b.errors import E2BAuthedRoute, e2b_error
from treadle.weaver.api.e2b.models import (
    ConnectBody,
    NewSandbox,
    PauseBody,
    RefreshBody,
    TimeoutBody,
)
from treadle.weaver.core import Weaver
from treadle.weaver.ids import SANDBOX
from treadle.weaver.services.auth import Principal
from treadle.weaver.services.cursors import decode_cursor
from treadle.weaver.services.sandboxes import sandbox_view

__all__ = ["router"]

router = APIRouter(tags=["e2b"], route_class=E2BAuthedRoute)
# How long pause and resume wait for the node to say it is done: E2B's answer them once it is.
_SETTLE_S = 30.0
# What the SDK's envVars and timeout are called in treadle's spec, for messages.
_NAMES = {"env": "envVars", "timeout_s": "timeout", "network": "allow_internet_access"}
_LISTED_STATUSES = {
    "running": (SandboxStatus.PENDING, SandboxStatus.STARTING, SandboxStatus.RUNNING),
    "paused": (SandboxStatus.PAUSED,),
}


async def _tenant(request: Request) -> str:
    principal: Principal = request.scope[PRINCIPAL]
    return principal.tenant_id


Tenant = Annotated[str, Depends(_tenant)]


async def _live(weaver: Weaver, tenant_id: str, value: str) -> dict[str, Any]:
    """The tenant's sandbox, unless it is gone (killed, ended): then not found, as in E2B."""
    try:
        view = sandbox_view(await weaver.sandboxes.get(tenant_id, views.treadle_id(value)))
    except NotFound:
        view = None
    if view is None or views.state_of(view) is None:
        # Named as the caller named it, not by treadle's id.
        raise NotFound(f"sandbox {value!r} not found")
    return view


# create


@router.post("/sandboxes", status_code=201, summary="Create a sandbox (e2b < 2.51)")
@router.post("/v2/sandboxes", status_code=201, summary="Create a sandbox")
async def create(body: NewSandbox, request: Request, tenant: Tenant, weaver: WeaverDep) -> Any:
    template = resolve(body.template_id)
    if views.TEMPLATE_KEY in body.metadata:
        raise InvalidRequest(f"metadata key {views.TEMPLATE_KEY!r} is treadle's own")
    try:
        spec = SandboxSpec(
            image=template.image,
            env={**template.env, **body.env_vars},
            metadata={**body.metadata, views.TEMPLATE_KEY: template.name},
            timeout_s=float(body.timeout or DEFAULT_TIMEOUT_S),
            on_expiry=ExpiryAction.PAUSE if body.auto_pause else ExpiryAction.STOP,
            # E2B's default is a sandbox with internet access; only a node whose operator
            # allows network can then hold it.
            network=body.allow_internet_access is not False,
            home=template.workdir,
            sudo=template.sudo,
            desktop=template.desktop,
            public_ports=body.public_traffic,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(_NAMES.get(str(part), str(part)) for part in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg']}") from None
    row = await weaver.sandboxes.create(tenant, spec)
    return views.sandbox(sandbox_view(row), views.domain_for(request))


# read


@router.get("/sandboxes/{sandbox_id}", summary="One sandbox")
async def get(sandbox_id: str, request: Request, tenant: Tenant, weaver: WeaverDep) -> Any:
    return views.detail(await _live(weaver, tenant, sandbox_id), views.domain_for(request))


def _metadata_filter(encoded: str | None) -> dict[str, str]:
    """The SDK sends `urlencode({quote(k): quote(v)})` as one query value."""
    if not encoded:
        return {}
    try:
        pairs = parse_qsl(encoded, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidRequest("metadata: not key=value pairs joined by &") from None
    if len(pairs) > 64:
        raise InvalidRequest("metadata: at most 64 key=value pairs")
    return {unquote(key): unquote(value) for key, value in pairs}


def _states(values: list[str] | None) -> list[str]:
    wanted = [s.strip() for value in values or [] for s in value.split(",") if s.strip()]
    for state in wanted:
        if state not in _LISTED_STATUSES:
            raise InvalidRequest(f"state: {state!r} is not running or paused")
    return wanted or list(_LISTED_STATUSES)


@router.get("/v2/sandboxes", summary="List sandboxes, newest first")
async def list_v2(
    response: Response,
    tenant: Tenant,
    weaver: WeaverDep,
    metadata: str | None = None,
    state: Annotated[list[str] | None, Query()] = None,
    template: Annotated[str | None, Query(max_length=256)] = None,
    started_after: Annotated[AwareDatetime | None, Query(alias="startedAfter")] = None,
    order: Literal["asc", "desc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=512)] = None,
) -> Any:
    if order == "asc":
        raise InvalidRequest("order: only desc (newest first) is supported by treadle")
    wanted = _metadata_filter(metadata)
    if template is not None:
        wanted[views.TEMPLATE_KEY] = template
    statuses = [s for state_ in _states(state) for s in _LISTED_STATUSES[state_]]
    try:
        if next_token:
            decode_cursor(next_token, SANDBOX)
    except InvalidRequest:
        raise InvalidRequest("nextToken: not one this API returned") from None
    items, cursor = await weaver.sandboxes.page(
        tenant, statuses=statuses, metadata=wanted, limit=limit, cursor=next_token or None
    )
    found = [views.listed(item) for item in items if views.state_of(item) is not None]
    if started_after is not None:
        after = started_after.timestamp()
        found = [item for item in found if _epoch(item["startedAt"]) > after]
    if cursor is not None:
        response.headers["X-Next-Token"] = cursor
    return found


@router.get("/sandboxes", summary="List running sandboxes (e2b 1.x)")
async def list_v1(tenant: Tenant, weaver: WeaverDep, metadata: str | None = None) -> Any:
    wanted = _metadata_filter(metadata)
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    # A tenant's live sandboxes are bounded (max_sandboxes_per_tenant), and so are the pages.
    for _ in range(1000):
        items, cursor = await weaver.sandboxes.page(
            tenant, statuses=_LISTED_STATUSES["running"], metadata=wanted, cursor=cursor
        )
        found += [views.listed(item) for item in items if views.state_of(item) == "running"]
        if cursor is None:
            break
    return found


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@router.get("/sandboxes/{sandbox_id}/metrics", summary="A sandbox's metrics")
async def metrics(
    sandbox_id: str,
    tenant: Tenant,
    weaver: WeaverDep,
    start: Annotated[int | None, Query(ge=0, le=10**11)] = None,
    end: Annotated[int | None, Query(ge=0, le=10**11)] = None,
) -> Any:
    """One `SandboxMetric` per usage record of the sandbox (every 5 s while it runs), from
    the usage ledger: its use over that interval (docs/metering.md)."""
    view = await _live(weaver, tenant, sandbox_id)
    until = float(end) if end is not None else time.time() + 1
    since = float(start) if start is not None else 0.0
    rows = await weaver.usage.records(tenant, "sandbox", view["id"], since, until, 1000)
    return [views.metric(row, view) for row in rows]


# change


@router.delete("/sandboxes/{sandbox_id}", status_code=204, summary="Kill a sandbox")
async def kill(sandbox_id: str, tenant: Tenant, weaver: WeaverDep) -> Response:
    view = await _live(weaver, tenant, sandbox_id)
    await weaver.sandboxes.desire(tenant, view["id"], Desired.STOPPED)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204, summary="End the TTL t s from now")
async def set_timeout(
    sandbox_id: str, body: TimeoutBody, tenant: Tenant, weaver: WeaverDep
) -> Response:
    view = await _live(weaver, tenant, sandbox_id)
    await weaver.sandboxes.set_timeout(tenant, view["id"], float(body.timeout))
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204, summary="Extend the TTL")
async def refresh(
    sandbox_id: str, tenant: Tenant, weaver: WeaverDep, body: RefreshBody | None = None
) -> Response:
    view = await _live(weaver, tenant, sandbox_id)
    duration = DEFAULT_TIMEOUT_S if body is None or body.duration is None else body.duration
    await _extend(weaver, tenant, view, duration)
    return Response(status_code=204)


async def _extend(weaver: Weaver, tenant: str, view: dict[str, Any], timeout_s: float) -> None:
    """The TTL runs at least `timeout_s` from now; a later deadline is kept."""
    deadline = None if view["expires_at"] is None else _epoch(view["expires_at"])
    if timeout_s > 0 and (deadline is None or deadline < time.time() + timeout_s):
        await weaver.sandboxes.set_timeout(tenant, view["id"], timeout_s)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204, summary="Pause a sandbox")
async def pause(
    sandbox_id: str, tenant: Tenant, weaver: WeaverDep, body: PauseBody | None = None
) -> Response:
    view = await _live(weaver, tenant, sandbox_id)
    if view["status"] == SandboxStatus.PAUSED.value:
        return e2b_error(409, f"sandbox {sandbox_id!r} is already paused")
    try:
        await weaver.sandboxes.desire(tenant, view["id"], Desired.PAUSED)
    except InvalidTransition as exc:
        if isinstance(exc.details, dict) and "isolation" in exc.details:
            raise InvalidRequest(exc.message) from None  # its tier cannot pause: not a race
        raise
    await _settled(weaver, tenant, sandbox_id, SandboxStatus.PAUSED)
    # E2B keeps a paused sandbox until it is resumed or killed; treadle's TTL would stop it,
    # so it is held for the longest TTL there is.
    await weaver.sandboxes.set_timeout(tenant, view["id"], MAX_TIMEOUT_S)
    return Response(status_code=204)


async def _resume(weaver: Weaver, tenant: str, sandbox_id: str, timeout_s: float) -> Any:
    view = await _live(weaver, tenant, sandbox_id)
    await weaver.sandboxes.desire(tenant, view["id"], Desired.RUNNING)
    await weaver.sandboxes.set_timeout(tenant, view["id"], timeout_s)
    return await _settled(weaver, tenant, sandbox_id, SandboxStatus.RUNNING)


@router.post("/sandboxes/{sandbox_id}/connect", summary="Connect (resume if paused), e2b < 2.51")
@router.post("/v2/sandboxes/{sandbox_id}/connect", summary="Connect, resuming if paused")
async def connect(
    sandbox_id: str,
    request: Request,
    tenant: Tenant,
    weaver: WeaverDep,
    body: ConnectBody | None = None,
) -> Any:
    timeout_s = float(body.timeout if body is not None and body.timeout else DEFAULT_TIMEOUT_S)
    view = await _live(weaver, tenant, sandbox_id)
    domain = views.domain_for(request)
    if SandboxStatus.PAUSED.value in (view["status"], view["desired"]):
        resumed = await _resume(weaver, tenant, sandbox_id, timeout_s)
        return JSONResponse(views.sandbox(resumed, domain), status_code=201)
    await _extend(weaver, tenant, view, timeout_s)
    return JSONResponse(views.sandbox(view, domain), status_code=200)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201, summary="Resume (e2b < 2.6)")
async def resume(
    sandbox_id: str,
    request: Request,
    tenant: Tenant,
    weaver: WeaverDep,
    body: ConnectBody | None = None,
) -> Any:
    view = await _live(weaver, tenant, sandbox_id)
    if SandboxStatus.PAUSED.value not in (view["status"], view["desired"]):
        return e2b_error(409, f"sandbox {sandbox_id!r} is already running")
    timeout_s = float(body.timeout if body is not None and body.timeout else DEFAULT_TIMEOUT_S)
    resumed = await _resume(weaver, tenant, sandbox_id, timeout_s)
    return views.sandbox(resumed, views.domain_for(request))


async def _settled(
    weaver: Weaver, tenant: str, sandbox_id: str, target: SandboxStatus
) -> dict[str, Any]:
    """The sandbox once its node reports `target` (E2B answers pause and resume then)."""
    wanted = Desired(target.value)
    deadline = asyncio.get_running_loop().time() + _SETTLE_S
    while True:
        view = await _live(weaver, tenant, sandbox_id)
        if view["status"] == target.value:
            return view
        if view["desired"] != wanted.value:
            # Its node could not do it (and said why), or another call asked otherwise.
            why = view["end_reason"] or f"it was asked to be {view['desired']} meanwhile"
            raise InvalidRequest(f"sandbox {sandbox_id!r} did not become {target.value}: {why}")
        if asyncio.get_running_loop().time() > deadline:
            # Asking again is safe: the call waits for the same change.
            raise Unavailable(f"sandbox {sandbox_id!r} is not {target.value} yet; try again")
        await weaver.sandboxes.changed(view["id"], within=1.0)


# What the SDK has, treadle does not (yet): a clear answer rather than a misleading 404 (the
# SDK reads a 404 on most calls as "sandbox not found").
_NOT_SUPPORTED = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@router.api_route(
    "/sandboxes/{sandbox_id}/{rest:path}", methods=_NOT_SUPPORTED, include_in_schema=False
)
@router.api_route("/v2/{rest:path}", methods=_NOT_SUPPORTED, include_in_schema=False)
@router.api_route("/templates/{rest:path}", methods=_NOT_SUPPORTED, include_in_schema=False)
@router.api_route("/snapshots", methods=_NOT_SUPPORTED, include_in_schema=False)
async def not_supported(request: Request) -> Response:
    return e2b_error(501, f"{request.method} {request.url.path} is not supported by treadle")
