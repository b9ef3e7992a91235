"""/v1/executions: read, list, cancel, output (fetch and follow)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import StreamingResponse

from treadle.domain.execution import ExecutionState, is_terminal
from treadle.weaver.api.deps import Caller, WeaverDep, get_weaver
from treadle.weaver.api.relays import follow_for_caller
from treadle.weaver.core import Weaver
from treadle.weaver.services.executions import OUTPUT_BATCH, output_complete
from treadle.weaver.views import execution_view

__all__ = ["router"]

router = APIRouter(prefix="/v1/executions", tags=["executions"])
_SEQ_MAX = 2**62  # what every database's 64-bit integers hold

# A cancelled execution's node reports the end of its output shortly after the kill; a
# follower waits this long for that report before it ends the stream anyway.
_SETTLE_S = 5.0


@router.get("", summary="List executions, newest first")
async def list_executions(
    caller: Caller,
    weaver: WeaverDep,
    state: ExecutionState | None = None,
    function: str | None = None,
    node_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> Any:
    items, next_cursor = await weaver.executions.page(
        caller.tenant_id,
        state=state,
        function=function,
        node_id=node_id,
        limit=limit,
        cursor=cursor,
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{execution_id}", summary="One execution")
async def get_execution(execution_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    return execution_view(await weaver.executions.get(caller.tenant_id, execution_id))


@router.get("/{execution_id}/placement", summary="Why it runs where it runs")
async def get_placement(execution_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    row = await weaver.executions.get(caller.tenant_id, execution_id)
    decided = row.node_id is not None and isinstance(row.placement, dict)
    named = [row.node_id] if row.node_id else []
    if decided and caller.admin:  # the fleet's other nodes are the operator's business
        named += [str(a.get("target")) for a in row.placement.get("runner_ups") or []]
    return {
        "node_names": await weaver.nodes.names(named),
        "execution_id": row.id,
        "state": row.state,
        "attempt": row.attempt,
        "node_id": row.node_id,
        "isolation": row.isolation,
        # Until it is placed: why not (it fits no node, or waits for one being provisioned).
        "pending_reason": row.pending_reason,
        "placement": row.placement if decided else None,
        "constraints": row.placement if not decided else None,
    }


@router.post("/{execution_id}/cancel", summary="Cancel an execution")
async def cancel_execution(execution_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    return execution_view(await weaver.executions.cancel(caller.tenant_id, execution_id))


@router.get("/{execution_id}/output", summary="Output of the latest attempt")
async def get_output(
    execution_id: str,
    caller: Caller,
    weaver: WeaverDep,
    after_seq: Annotated[int | None, Query(ge=-1, le=_SEQ_MAX)] = None,
) -> Any:
    row = await weaver.executions.get(caller.tenant_id, execution_id)
    document = await weaver.executions.output(row, after_seq)
    return StreamingResponse(document, media_type="application/json")


@router.websocket("/{execution_id}/output")
async def follow_output(
    websocket: WebSocket,
    execution_id: str,
    after_seq: Annotated[int, Query(ge=-1, le=_SEQ_MAX)] = -1,
) -> None:
    weaver = get_weaver(websocket)

    async def follow(tenant_id: str) -> None:
        await _follow(websocket, weaver, tenant_id, execution_id, after_seq)

    await follow_for_caller(websocket, follow)


async def _follow(
    websocket: WebSocket, weaver: Weaver, tenant_id: str, execution_id: str, last: int
) -> None:
    executions = weaver.executions
    subscription = weaver.bus.subscribe([f"output.{execution_id}", f"execution.{execution_id}"])
    try:
        row = await executions.get(tenant_id, execution_id)
        attempt = row.attempt
        ended_at: float | None = None
        while True:
            if row.attempt != attempt:
                attempt, last = row.attempt, -1
                await websocket.send_json({"type": "attempt", "attempt": attempt})
            while True:
                chunks = await executions.chunks_after(row, last, OUTPUT_BATCH)
                for chunk in chunks:
                    await websocket.send_json(
                        {
                            "type": "chunk",
                            "stream": chunk.stream,
                            "seq": chunk.seq,
                            "data": chunk.data,
                        }
                    )
                    last = chunk.seq
                if len(chunks) < OUTPUT_BATCH:
                    break
            if is_terminal(ExecutionState(row.state)):
                ended_at = ended_at or time.monotonic()
                if output_complete(row, last + 1) or time.monotonic() - ended_at > _SETTLE_S:
                    await websocket.send_json({"type": "end", "execution": execution_view(row)})
                    await websocket.close(code=1000)
                    return
            # The timeout only bounds how long a missed notification could delay us.
            await subscription.get(within=1.0)
            # Notifications only mean "look again", and the read below sees everything they
            # announced; those already queued (one per output frame) would only cost reads.
            subscription.drain()
            row = await executions.get(tenant_id, execution_id)
    finally:
        subscription.close()
