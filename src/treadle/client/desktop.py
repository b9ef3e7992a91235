"""`sandbox.desktop`: the screen of a desktop sandbox, for an agent (screenshots and input)
and for a person (a viewer URL). Every method is one request; `batch` runs many actions and
answers with one screenshot, which is how an agent loop spends the least time.

Actions are treadle's (`{"type": "click", "x": 10, "y": 20}`) or a computer-use tool call as
the model made it (`{"action": "left_click", "coordinate": [10, 20]}`); see docs/api.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from treadle.client import _desktop_api as dapi
from treadle.client._api import JSONObject
from treadle.client._async import AsyncClient
from treadle.client._desktop_api import Action, ActionsResult
from treadle.client._sync import Client

__all__ = ["ActionsResult", "AsyncDesktop", "Desktop"]


class Desktop:
    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    def info(self) -> JSONObject:
        """The display: `{"width", "height", "depth", ...}`."""
        return self._client._send(dapi.describe(self._id))

    def screenshot(
        self,
        *,
        format: str = "png",
        quality: int | None = None,
        region: tuple[int, int, int, int] | None = None,
        scale: float | None = None,
        cursor: bool = False,
    ) -> bytes:
        """The screen (or `region`: x, y, width, height) as PNG or JPEG bytes."""
        call = dapi.screenshot(
            self._id, format=format, quality=quality, region=region, scale=scale, cursor=cursor
        )
        return self._client._send(call)

    def batch(
        self, actions: Sequence[Action], *, screenshot: bool | Mapping[str, Any] = False
    ) -> ActionsResult:
        """Run `actions` in order, then take one screenshot if asked (`True`, or its
        options: `{"format": "jpeg", "quality": 70, "region": [x, y, w, h], "scale": 0.5}`)."""
        return self._client._send(dapi.actions(self._id, actions, screenshot))

    def click(
        self, x: int | None = None, y: int | None = None, *, button: str = "left", count: int = 1
    ) -> None:
        self.batch([dapi.click(x, y, button, count)])

    def double_click(self, x: int | None = None, y: int | None = None) -> None:
        self.click(x, y, count=2)

    def move(self, x: int, y: int) -> None:
        self.batch([{"type": "move", "x": x, "y": y}])

    def drag(self, path: Sequence[tuple[int, int]], *, button: str = "left") -> None:
        self.batch([{"type": "drag", "path": [list(p) for p in path], "button": button}])

    def scroll(
        self, dy: int = 3, dx: int = 0, *, x: int | None = None, y: int | None = None
    ) -> None:
        action: JSONObject = {"type": "scroll", "dx": dx, "dy": dy}
        if x is not None and y is not None:
            action.update(x=x, y=y)
        self.batch([action])

    def type(self, text: str) -> None:
        """Type any Unicode text, newlines as Return."""
        self.batch([{"type": "type", "text": text}])

    def key(self, keys: str | Sequence[str], *, repeat: int = 1) -> None:
        """Press a key or a chord: "Return", "ctrl+l", ["ctrl", "shift", "t"]."""
        chord = keys if isinstance(keys, str) else list(keys)
        self.batch([{"type": "key", "keys": chord, "repeat": repeat}])

    def cursor(self) -> tuple[int, int]:
        result = self.batch([{"type": "cursor"}])
        x, y = result.results[0]
        return int(x), int(y)

    def size(self) -> tuple[int, int]:
        result = self.batch([{"type": "size"}])
        width, height = result.results[0]
        return int(width), int(height)

    def stream_url(self, *, view_only: bool = True, expires_in: float = 3600.0) -> str:
        """A URL that opens the live screen in a browser until it expires, for a person to
        watch (or, with `view_only=False`, to take control)."""
        return self._client._send(dapi.viewer(self._id, view_only=view_only, expires_in=expires_in))


class AsyncDesktop:
    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    async def info(self) -> JSONObject:
        return await self._client._send(dapi.describe(self._id))

    async def screenshot(
        self,
        *,
        format: str = "png",
        quality: int | None = None,
        region: tuple[int, int, int, int] | None = None,
        scale: float | None = None,
        cursor: bool = False,
    ) -> bytes:
        call = dapi.screenshot(
            self._id, format=format, quality=quality, region=region, scale=scale, cursor=cursor
        )
        return await self._client._send(call)

    async def batch(
        self, actions: Sequence[Action], *, screenshot: bool | Mapping[str, Any] = False
    ) -> ActionsResult:
        return await self._client._send(dapi.actions(self._id, actions, screenshot))

    async def click(
        self, x: int | None = None, y: int | None = None, *, button: str = "left", count: int = 1
    ) -> None:
        await self.batch([dapi.click(x, y, button, count)])

    async def type(self, text: str) -> None:
        await self.batch([{"type": "type", "text": text}])

    async def key(self, keys: str | Sequence[str], *, repeat: int = 1) -> None:
        chord = keys if isinstance(keys, str) else list(keys)
        await self.batch([{"type": "key", "keys": chord, "repeat": repeat}])

    async def stream_url(self, *, view_only: bool = True, expires_in: float = 3600.0) -> str:
        return await self._client._send(
            dapi.viewer(self._id, view_only=view_only, expires_in=expires_in)
        )
