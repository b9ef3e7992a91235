"""/v1/sandboxes/{id}/processes: the processes exec'd in a sandbox, listed, signalled, and
attached to again after their client went away (by pid, or by the tag they were started
with)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, WebSocket
from pydantic import BaseModel, ConfigDict, Field

from treadle.domain.errors import InvalidRequest, InvalidTransition, NotFound
from treadle.protocol import ProcessCall
from treadle.protocol.limits import INT32_MAX
from treadle.weaver.api.deps import Caller, WeaverDep, get_weaver
from treadle.weaver.api.sandbox_errors import sandbox_error
from treadle.weaver.api.sandboxes import running_node, serve_stream
from treadle.weaver.services.streams import Ended, ExecStream

__all__ = ["router"]

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
Ref = Annotated[str, Path(min_length=1, max_length=256, description="a pid, or a tag")]
# What a node may say of one process; anything else it sends is dropped.
_FIELDS = {
    "pid": int,
    "tag": str,
    "argv": list,
    "pty": bool,
    "running": bool,
    "exit_code": int,
    "signal": int,
    "timed_out": bool,
    "started_at": float,
}


def _ref(ref: str) -> tuple[int | None, str | None]:
    if ref.isdigit():
        pid = int(ref)
        if not 1 <= pid <= INT32_MAX:
            raise InvalidRequest(f"no such pid: {ref}", details={"pid": ref})
        return pid, None
    return None, ref


def _checked(ended: Ended, sandbox_id: str, ref: str | None = None) -> Any:
    if ended.error_code == "ESRCH":
        raise NotFound(f"sandbox {sandbox_id} has no exec'd process {ref!r}", details={"ref": ref})
    if ended.error is not None:
        raise sandbox_error(ended, {"id": sandbox_id}, otherwise=InvalidTransition)
    return ended.result


def _process_view(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    view: dict[str, Any] = {}
    for key, kind in _FIELDS.items():
        value = raw.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        view[key] = value if isinstance(value, kind) else None
    if isinstance(view["argv"], list):
        view["argv"] = [a for a in view["argv"] if isinstance(a, str)]
    return view


@router.get("/{sandbox_id}/processes", summary="The processes exec'd in a sandbox")
async def list_processes(sandbox_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    row, session = await running_node(weaver, caller.tenant_id, sandbox_id)
    stream = weaver.streams.start(
        session, caller.tenant_id, ProcessCall, row.id, row.incarnation, op="list"
    )
    result = _checked(await stream.wait(), sandbox_id)
    items = [_process_view(item) for item in result] if isinstance(result, list) else []
    return {"items": [item for item in items if item is not None]}


class SignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signal: int = Field(ge=1, le=64)


@router.post("/{sandbox_id}/processes/{ref}/signal", summary="Signal an exec'd process")
async def signal_process(
    sandbox_id: str, ref: Ref, body: SignalBody, caller: Caller, weaver: WeaverDep
) -> Any:
    """Sends the signal to the process's group; the process as it was when signalled."""
    pid, tag = _ref(ref)
    row, session = await running_node(weaver, caller.tenant_id, sandbox_id)
    stream = weaver.streams.start(
        session,
        caller.tenant_id,
        ProcessCall,
        row.id,
        row.incarnation,
        op="signal",
        pid=pid,
        tag=tag,
        signal=body.signal,
    )
    return _process_view(_checked(await stream.wait(), sandbox_id, ref))


@router.websocket("/{sandbox_id}/processes/{ref}")
async def attach(websocket: WebSocket, sandbox_id: str, ref: str) -> None:
    """Follow an exec'd process again, as the exec WebSocket does: `{"started"}`, the output
    it wrote while nobody followed it (up to 1 MiB, the oldest dropped first), then live
    output and `{"exit"}`; stdin, signals and resizes as on exec. A client attaching takes
    the process over from one still following it."""
    weaver = get_weaver(websocket)

    async def opening(tenant_id: str) -> ExecStream:
        if len(ref) > 256:
            raise InvalidRequest("a process is named by its pid or a tag of 256 characters")
        pid, tag = _ref(ref)
        row, session = await running_node(weaver, tenant_id, sandbox_id)
        stream = weaver.streams.start(
            session, tenant_id, ProcessCall, row.id, row.incarnation, op="attach", pid=pid, tag=tag
        )
        if await stream.started() is None:
            _checked(await stream.wait(), sandbox_id, ref)
        return stream

    await serve_stream(websocket, opening)
