"""/v1/nodes and /v1/tenants (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from treadle.weaver.api.deps import Admin, get_weaver
from treadle.weaver.core import Weaver

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["admin"])
WeaverDep = Annotated[Weaver, Depends(get_weaver)]


class TenantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    admin: bool = False


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


@router.post("/tenants/{tenant_id}/keys", status_code=201, summary="Create an API key")
async def create_key(tenant_id: str, body: KeyRequest, _admin: Admin, weaver: WeaverDep) -> Any:
    key_id, key = await weaver.auth.create_key(tenant_id, body.admin)
    return JSONResponse({"id": key_id, "api_key": key}, status_code=201)
