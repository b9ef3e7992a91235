"""/v1/nodes and /v1/tenants (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from treadle.domain.quotas import TenantLimits
from treadle.weaver.api.deps import Admin, WeaverDep
from treadle.weaver.core import Weaver

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["admin"])


class TenantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    admin: bool = False


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # strict: a string such as "yes" is a mistake, not a permission
    allow_process_tier: bool = Field(strict=True)


@router.get("/nodes", summary="Nodes of the fleet")
async def list_nodes(_admin: Admin, weaver: WeaverDep) -> Any:
    return {"items": await weaver.nodes.list_nodes(), "next_cursor": None}


@router.get("/nodes/{node_id}", summary="One node")
async def get_node(node_id: str, _admin: Admin, weaver: WeaverDep) -> Any:
    return await weaver.nodes.get(node_id)


@router.post("/nodes/{node_id}/drain", summary="Place no new work on a node")
async def drain_node(node_id: str, _admin: Admin, weaver: WeaverDep) -> Any:
    return await weaver.nodes.drain(node_id)


@router.post("/tenants", status_code=201, summary="Create a tenant and its first API key")
async def create_tenant(body: TenantRequest, _admin: Admin, weaver: WeaverDep) -> Any:
    tenant, key = await weaver.auth.create_tenant(body.name)
    return JSONResponse({"tenant": tenant, "api_key": key}, status_code=201)


@router.get("/tenants", summary="Tenants")
async def list_tenants(_admin: Admin, weaver: WeaverDep) -> Any:
    return {"items": await weaver.auth.list_tenants(), "next_cursor": None}


@router.get("/tenants/{tenant_id}", summary="One tenant")
async def get_tenant(tenant_id: str, _admin: Admin, weaver: WeaverDep) -> Any:
    return await weaver.auth.get_tenant(tenant_id)


@router.patch(
    "/tenants/{tenant_id}",
    summary="Change a tenant's permissions",
    description="`allow_process_tier`: whether the tenant's functions may name the `process` "
    "tier, which isolates nothing (default false).",
)
async def update_tenant(
    tenant_id: str, body: TenantUpdate, _admin: Admin, weaver: WeaverDep
) -> Any:
    return await weaver.auth.set_process_tier(tenant_id, body.allow_process_tier)


@router.post("/tenants/{tenant_id}/keys", status_code=201, summary="Create an API key")
async def create_key(tenant_id: str, body: KeyRequest, _admin: Admin, weaver: WeaverDep) -> Any:
    key_id, key = await weaver.auth.create_key(tenant_id, body.admin)
    return JSONResponse({"id": key_id, "api_key": key}, status_code=201)


@router.put("/tenants/{tenant_id}/limits", summary="Set a tenant's quotas and budget")
async def set_limits(tenant_id: str, body: TenantLimits, _admin: Admin, weaver: WeaverDep) -> Any:
    """Replace them whole: a limit left out is no limit (`{}`: none at all)."""
    await weaver.auth.get_tenant(tenant_id)  # 404 for one that is not there
    await weaver.quotas.set_limits(tenant_id, body)
    return await limits_view(tenant_id, weaver)


@router.get("/tenants/{tenant_id}/limits", summary="A tenant's quotas, budget and use")
async def get_limits(tenant_id: str, _admin: Admin, weaver: WeaverDep) -> Any:
    await weaver.auth.get_tenant(tenant_id)
    return await limits_view(tenant_id, weaver)


async def limits_view(tenant_id: str, weaver: Weaver) -> dict[str, Any]:
    limits = await weaver.quotas.limits(tenant_id)
    period = limits.period if limits is not None else "month"
    used = await weaver.quotas.in_use(tenant_id, period)
    return {
        "tenant_id": tenant_id,
        "limits": None if limits is None else limits.model_dump(),
        "in_use": used.model_dump(),
    }
