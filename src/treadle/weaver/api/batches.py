"""Batch invoke (map): `POST /v1/functions/{name}/map`, `GET /v1/batches/{id}` and the
results as they end on `WS /v1/batches/{id}/results`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import JSONResponse

from treadle.domain.errors import InvalidRequest
from treadle.weaver.api.deps import Caller, WeaverDep, get_weaver
from treadle.weaver.api.relays import follow_for_caller
from treadle.weaver.core import Weaver
from treadle.weaver.services.batches import MapRequest
from treadle.weaver.services.cursors import decode_cursor, encode_cursor
from treadle.weaver.views import iso

__all__ = ["router"]

router = APIRouter(tags=["batches"])
Wait = Annotated[
    float | None,
    Query(ge=0, le=300, description="seconds to block until the items listed have ended"),
]
Limit = Annotated[int, Query(ge=1, le=1000)]
_DEFAULT_PAGE = 100


@router.post("/v1/functions/{name}/map", status_code=202, summary="Run a function on many inputs")
async def map_function(
    name: str,
    body: MapRequest,
    request: Request,
    caller: Caller,
    weaver: WeaverDep,
    wait: Wait = None,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Limit = _DEFAULT_PAGE,
) -> Any:
    # The guard (`limits`) has read the whole body by now: its size, when it was declared.
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isascii() and declared.isdigit() else None
    created = await weaver.map(caller.tenant_id, name, body, version, size)
    status = 202 if created.created else 200
    view = await _view(weaver, caller.tenant_id, created.batch, 0, limit, wait)
    return JSONResponse(view, status_code=200 if view["done"] else status)


@router.get("/v1/batches/{batch_id}", summary="A batch and a page of its items, by index")
async def get_batch(
    batch_id: str,
    caller: Caller,
    weaver: WeaverDep,
    cursor: str | None = None,
    limit: Limit = _DEFAULT_PAGE,
    wait: Wait = None,
) -> Any:
    batch = await weaver.batches.get(caller.tenant_id, batch_id)
    start = 0 if cursor is None else _index_of(cursor) + 1
    return await _view(weaver, caller.tenant_id, batch, start, limit, wait)


@router.websocket("/v1/batches/{batch_id}/results")
async def batch_results(websocket: WebSocket, batch_id: str) -> None:
    """Each item once it has ended, in the order they end (refused and already ended ones
    first), in `{"type": "results", "items": [...]}` messages of those that ended together,
    then `{"type": "end"}` with the batch's counts."""
    weaver = get_weaver(websocket)

    async def send_all(tenant_id: str) -> None:
        batch = await weaver.batches.get(tenant_id, batch_id)
        async for items in weaver.batches.results(batch):
            await websocket.send_json({"type": "results", "items": items})
        counts = await weaver.batches.counts(batch)
        await websocket.send_json({"type": "end", "counts": counts})
        await websocket.close(code=1000)

    await follow_for_caller(websocket, send_all)


async def _view(
    weaver: Weaver, tenant_id: str, batch: Any, start: int, limit: int, wait: float | None
) -> dict[str, Any]:
    batches = weaver.batches
    stop = min(start + limit, batch.size)
    if wait:
        items = await batches.wait_for(tenant_id, batch, start, stop, wait)
    else:
        items = await batches.items(batch, start, stop)
    counts = await batches.counts(batch)
    return {
        "id": batch.id,
        "function": batch.function,
        "version": batch.version,
        "size": batch.size,
        "idempotency_key": batch.idempotency_key,
        "created_at": iso(batch.created_at),
        "counts": counts,
        "done": batches.finished(counts, batch),
        "items": items,
        "next_cursor": encode_cursor(f"ix_{stop - 1}") if stop < batch.size else None,
    }


def _index_of(cursor: str) -> int:
    value = decode_cursor(cursor, "ix")[3:]
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise InvalidRequest(
            "cursor is not one this API returned",
            details=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        )
    return int(value)
