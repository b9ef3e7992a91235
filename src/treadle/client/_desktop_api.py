"""The desktop of a sandbox (`sandbox.desktop`), as calls both clients send: screenshots and
input through ctrl, and viewer URLs for stream. See docs/api.md "Desktop"."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from treadle.client._api import Call, JSONObject, parse_empty, parse_object

__all__ = ["ActionsResult", "actions", "describe", "screenshot", "viewer"]

Action = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ActionsResult:
    """What a batch gave: each action's result (the cursor for `cursor`, the size for
    `size`, else None), where the pointer is now, and the screenshot asked for."""

    results: list[Any]
    cursor: tuple[int, int] | None
    image: bytes | None
    # {"format", "width", "height", "region", "media_type"}; None without a screenshot
    screenshot: JSONObject | None


def _path(sandbox_id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{sandbox_id}/desktop{rest}"


def describe(sandbox_id: str) -> Call[JSONObject]:
    return Call("GET", _path(sandbox_id), parse_object)


def _result(response: httpx.Response) -> ActionsResult:
    body = parse_object(response)
    shot = body.get("screenshot")
    image = None
    if isinstance(shot, dict) and shot.get("data"):
        image = base64.b64decode(shot.pop("data"))
    cursor = body.get("cursor")
    return ActionsResult(
        results=list(body.get("results") or []),
        cursor=(int(cursor[0]), int(cursor[1])) if cursor else None,
        image=image,
        screenshot=shot if isinstance(shot, dict) else None,
    )


def actions(
    sandbox_id: str, steps: Sequence[Action], screenshot: bool | Mapping[str, Any] | None
) -> Call[ActionsResult]:
    body: JSONObject = {"actions": [dict(step) for step in steps]}
    if screenshot:
        body["screenshot"] = dict(screenshot) if isinstance(screenshot, Mapping) else True
    # A batch may wait up to a minute in the sandbox.
    return Call("POST", _path(sandbox_id, "/actions"), _result, json=body, read_timeout=120.0)


def screenshot(
    sandbox_id: str,
    *,
    format: str = "png",
    quality: int | None = None,
    region: tuple[int, int, int, int] | None = None,
    scale: float | None = None,
    cursor: bool = False,
) -> Call[bytes]:
    params: dict[str, Any] = {"format": format}
    if quality is not None:
        params["quality"] = quality
    if region is not None:
        params.update(zip(("x", "y", "width", "height"), region, strict=True))
    if scale is not None:
        params["scale"] = scale
    if cursor:
        params["cursor"] = "true"
    return Call("GET", _path(sandbox_id, "/screenshot"), _image, params=params)


def _image(response: httpx.Response) -> bytes:
    parse_empty(response)  # an error answer raises
    return response.content


def viewer(sandbox_id: str, *, view_only: bool, expires_in: float) -> Call[str]:
    body = {"view_only": view_only, "expires_in_s": expires_in}
    return Call(
        "POST",
        _path(sandbox_id, "/viewer"),
        lambda response: str(parse_object(response)["url"]),
        json=body,
    )


def click(x: int | None, y: int | None, button: str, count: int) -> JSONObject:
    action: JSONObject = {"type": "click", "button": button, "count": count}
    if x is not None and y is not None:
        action.update(x=x, y=y)
    return action
