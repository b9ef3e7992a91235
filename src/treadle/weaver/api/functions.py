"""/v1/functions and invoke."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from treadle.domain.execution import ExecutionState, is_terminal
from treadle.domain.function import NAME_PATTERN, FunctionSpec
from treadle.weaver.api.deps import Caller, WeaverDep
from treadle.weaver.services.executions import InvokeRequest
from treadle.weaver.views import execution_view

__all__ = ["router"]

router = APIRouter(prefix="/v1/functions", tags=["functions"])
Name = Annotated[str, Query(pattern=NAME_PATTERN)]


@router.post("", status_code=201, summary="Register a function (a new version)")
async def create_function(spec: FunctionSpec, caller: Caller, weaver: WeaverDep) -> Any:
    record, created = await weaver.functions.create(caller.tenant_id, spec)
    return JSONResponse(record.view(), status_code=201 if created else 200)


@router.get("", summary="Latest version of each function")
async def list_functions(caller: Caller, weaver: WeaverDep) -> Any:
    records = await weaver.functions.latest_versions(caller.tenant_id)
    return {"items": [record.view() for record in records], "next_cursor": None}


@router.get("/{name}", summary="A function (latest version unless ?version=N)")
async def get_function(
    name: str,
    caller: Caller,
    weaver: WeaverDep,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Any:
    return (await weaver.functions.get(caller.tenant_id, name, version)).view()


@router.delete("/{name}", status_code=204, summary="Delete every version of a function")
async def delete_function(name: str, caller: Caller, weaver: WeaverDep) -> Response:
    await weaver.functions.delete(caller.tenant_id, name)
    return Response(status_code=204)


@router.post("/{name}/invoke", status_code=202, summary="Run a function")
async def invoke(
    name: str,
    caller: Caller,
    weaver: WeaverDep,
    body: InvokeRequest | None = None,
    wait: Annotated[
        float | None, Query(ge=0, le=300, description="seconds to block for a terminal state")
    ] = None,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Any:
    row = await weaver.invoke(caller.tenant_id, name, body or InvokeRequest(), version, wait)
    done = is_terminal(ExecutionState(row.state))
    return JSONResponse(execution_view(row), status_code=200 if done else 202)
