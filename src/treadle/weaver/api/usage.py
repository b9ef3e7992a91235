"""GET /v1/usage: what a tenant's work used and cost, from the ledger (docs/metering.md)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from treadle.domain.errors import Forbidden, InvalidRequest
from treadle.weaver.api.deps import Caller, WeaverDep
from treadle.weaver.services.usage import GROUPS, LABEL_GROUP, LABEL_KEY
from treadle.weaver.views import iso

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["usage"])
_DAY_S = 86400.0
_MAX_PERIOD_S = 400 * _DAY_S


def _instant(value: str | None, name: str, default: float) -> float:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{name} must be an ISO 8601 time, e.g. 2026-12-05T00:00:00Z",
            details=[{"loc": ["query", name], "msg": "not an ISO 8601 time"}],
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@router.get("/usage", summary="What work used and cost, summed")
async def usage(
    caller: Caller,
    weaver: WeaverDep,
    start: Annotated[str | None, Query(alias="from", max_length=64)] = None,
    end: Annotated[str | None, Query(alias="to", max_length=64)] = None,
    group_by: Annotated[list[str] | None, Query(max_length=4)] = None,
    kind: Annotated[str | None, Query(pattern="^(execution|sandbox)$")] = None,
    function: Annotated[str | None, Query(max_length=64)] = None,
    sandbox: Annotated[str | None, Query(max_length=64)] = None,
    node: Annotated[str | None, Query(max_length=64)] = None,
    tenant: Annotated[str | None, Query(max_length=64)] = None,
    label: Annotated[list[str] | None, Query(max_length=8)] = None,
) -> Any:
    """Records that ended in [`from`, `to`) (default: the last 24 hours), summed per group
    (`group_by`, repeatable or comma-separated: tenant, kind, function, sandbox, node, hour,
    day, or `label:KEY` for the value of a sandbox's metadata KEY); `label=KEY=VALUE`
    (repeatable) keeps the sandboxes whose metadata has KEY set to VALUE. A tenant sees its
    own; an admin sees every tenant's, or one (`tenant`)."""
    now = time.time()
    until = _instant(end, "to", now)
    since = _instant(start, "from", until - _DAY_S)
    if not since < until or until - since > _MAX_PERIOD_S:
        raise InvalidRequest(
            "the period is from before to, 400 days at most",
            details=[{"loc": ["query", "from"], "msg": "not a period"}],
        )
    asked = [name.strip() for value in group_by or [] for name in value.split(",")]
    groups = list(dict.fromkeys(name for name in asked if name))
    if len(groups) > 4:
        raise InvalidRequest(
            "group_by names 4 groups at most",
            details=[{"loc": ["query", "group_by"], "msg": "too many groups"}],
        )
    for name in groups:
        key = name.removeprefix(LABEL_GROUP) if name.startswith(LABEL_GROUP) else None
        if name not in GROUPS and (key is None or not LABEL_KEY.fullmatch(key)):
            raise InvalidRequest(
                f"group_by {name!r} is none of {', '.join(GROUPS)}, nor label:KEY",
                details=[{"loc": ["query", "group_by"], "msg": "unknown group"}],
            )
    labels: dict[str, str] = {}
    for pair in label or []:
        key, equals, value = pair.partition("=")
        if not equals or not LABEL_KEY.fullmatch(key) or len(value) > 512:
            raise InvalidRequest(
                f"label {pair[:80]!r} is not KEY=VALUE (KEY: letters, digits, _.:/-, "
                "64 at most; VALUE: 512 characters at most)",
                details=[{"loc": ["query", "label"], "msg": "not KEY=VALUE"}],
            )
        labels[key] = value
    if caller.admin:
        tenant_id = tenant
    elif tenant is not None and tenant != caller.tenant_id:
        raise Forbidden("only an admin reads another tenant's usage")
    else:
        tenant_id = caller.tenant_id
    summary = await weaver.usage.summary(
        tenant_id=tenant_id,
        start=since,
        end=until,
        group_by=groups,
        kind=kind,
        function=function,
        sandbox=sandbox,
        node=node,
        labels=labels,
    )
    return {"from": iso(since), "to": iso(until), "group_by": groups, **summary}
