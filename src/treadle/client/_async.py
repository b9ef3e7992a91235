"""The asyncio client: `AsyncClient`, the same methods as `Client`, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import httpx

from treadle.client import _api, _map
from treadle.client._api import Call, JSONObject
from treadle.client._sync import DEFAULT_TIMEOUT, STREAM_OPEN_TIMEOUT_S
from treadle.client.config import ClientConfig, load_config
from treadle.client.errors import TreadleConnectionError

if TYPE_CHECKING:
    from treadle.domain.function import FunctionSpec

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """An asyncio client for the treadle REST API; see `Client` for the conventions.

    async with AsyncClient() as treadle:
        execution = await treadle.invoke("add", wait=30)
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config: ClientConfig = load_config(url, api_key)
        self._timeout = httpx.Timeout(timeout)
        self._http = httpx.AsyncClient(
            base_url=self.config.url,
            timeout=self._timeout,
            transport=transport,
            limits=_api.POOL_LIMITS,
            verify=_api.tls_context(),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self, call: Call[Any]) -> dict[str, str]:
        if not call.auth:
            return {}
        return {"Authorization": f"Bearer {self.config.require_api_key()}"}

    async def _send(self, call: Call[T]) -> T:
        timeout = _api.timeout_for(call, self._timeout)
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                headers=self._headers(call),
                timeout=timeout,
            )
        except httpx.TransportError as exc:
            raise _api.connection_error(self.config.url, exc) from exc
        return call.parse(response)

    # functions

    async def create_function(self, spec: Mapping[str, Any] | FunctionSpec) -> JSONObject:
        return await self._send(_api.create_function(spec))

    async def list_functions(self) -> JSONObject:
        return await self._send(_api.list_functions())

    async def get_function(self, name: str, version: int | None = None) -> JSONObject:
        return await self._send(_api.get_function(name, version))

    async def delete_function(self, name: str) -> None:
        await self._send(_api.delete_function(name))

    # executions

    async def invoke(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        stdin: str | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        version: int | None = None,
        strategy: str | None = None,
    ) -> JSONObject:
        call = _api.invoke(
            name,
            args,
            stdin=stdin,
            idempotency_key=idempotency_key,
            wait=wait,
            version=version,
            strategy=strategy,
        )
        return await self._send(call)

    async def get_execution(self, execution_id: str) -> JSONObject:
        return await self._send(_api.get_execution(execution_id))

    # batches (map)

    async def map(
        self,
        name: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        batch_size: int = _map.DEFAULT_BATCH_SIZE,
        version: int | None = None,
        strategy: str | None = None,
    ) -> AsyncIterator[Any]:
        """As `Client.map`: `async for execution in treadle.map("f", inputs)`."""
        chunks = _map.batches(inputs, batch_size)
        ahead = await self._submit(name, next(chunks, None), version, strategy)
        offset = 0
        while ahead is not None:
            current = ahead
            ahead = await self._submit(name, next(chunks, None), version, strategy)
            async for value in self._gather(current, ordered, return_exceptions, offset):
                yield value
            offset += current["size"]

    async def get_batch(
        self, batch_id: str, cursor: str | None = None, limit: int = 100, wait: float | None = None
    ) -> JSONObject:
        """As `Client.get_batch`."""
        return await self._send(_map.get_batch(batch_id, cursor=cursor, limit=limit, wait=wait))

    async def _submit(
        self, name: str, items: list[JSONObject] | None, version: int | None, strategy: str | None
    ) -> JSONObject | None:
        if items is None:
            return None
        call = _map.map_batch(
            name, items, idempotency_key=_map.new_key(), version=version, strategy=strategy
        )
        for attempt in range(_map.MAX_REOPEN + 1):
            try:
                return await self._send(call)
            except TreadleConnectionError:
                if attempt == _map.MAX_REOPEN:
                    raise
        raise AssertionError("unreachable")

    async def _gather(
        self, batch: JSONObject, ordered: bool, return_exceptions: bool, offset: int
    ) -> AsyncIterator[Any]:
        from websockets.asyncio.client import connect

        url = _map.results_url(self.config.url, batch["id"])
        gather = _map.Gather(
            batch["size"],
            ordered=ordered,
            return_exceptions=return_exceptions,
            url=url,
            offset=offset,
        )
        headers = {"Authorization": f"Bearer {self.config.require_api_key()}"}
        breaks = 0
        while not gather.complete:
            try:
                async with connect(
                    url,
                    additional_headers=headers,
                    open_timeout=STREAM_OPEN_TIMEOUT_S,
                    max_size=None,
                ) as websocket:
                    async for raw in websocket:
                        for value in gather.take(raw):
                            yield value
                        if gather.ended:
                            return
            except _api.STREAM_ERRORS as exc:
                breaks += 1
                if breaks > _map.MAX_REOPEN:
                    raise _api.stream_error(url, exc) from exc

    async def list_executions(
        self,
        state: str | None = None,
        function: str | None = None,
        node_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JSONObject:
        call = _api.list_executions(
            state=state, function=function, node_id=node_id, limit=limit, cursor=cursor
        )
        return await self._send(call)

    async def iter_executions(
        self,
        state: str | None = None,
        function: str | None = None,
        node_id: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[JSONObject]:
        cursor: str | None = None
        while True:
            page = await self.list_executions(state, function, node_id, page_size, cursor)
            for item in page["items"]:
                yield item
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def placement(self, execution_id: str) -> JSONObject:
        """Where the execution was placed and why (scores per criterion, rejections)."""
        return await self._send(_api.placement(execution_id))

    async def cancel(self, execution_id: str) -> JSONObject:
        return await self._send(_api.cancel(execution_id))

    async def output(self, execution_id: str, after_seq: int | None = None) -> JSONObject:
        return await self._send(_api.output(execution_id, after_seq))

    async def follow(
        self, execution_id: str, after_seq: int | None = None
    ) -> AsyncIterator[JSONObject]:
        from websockets.asyncio.client import connect

        url = _api.output_stream_url(self.config.url, execution_id, after_seq)
        headers = {"Authorization": f"Bearer {self.config.require_api_key()}"}
        try:
            websocket = await connect(
                url,
                additional_headers=headers,
                open_timeout=STREAM_OPEN_TIMEOUT_S,
                max_size=None,
            )
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc
        async with websocket:
            try:
                async for raw in websocket:
                    message = _api.decode_stream_message(raw, url)
                    yield message
                    if message["type"] == "end":
                        return
            except _api.STREAM_ERRORS as exc:
                raise _api.stream_error(url, exc) from exc
        raise _api.stream_error(url)

    # nodes, tenants, health

    async def usage(self, **filters: Unpack[_api.UsageFilters]) -> JSONObject:
        """As `Client.usage`."""
        return await self._send(_api.usage(**filters))

    async def nodes(self) -> JSONObject:
        return await self._send(_api.nodes())

    async def get_node(self, node_id: str) -> JSONObject:
        return await self._send(_api.get_node(node_id))

    async def drain_node(self, node_id: str) -> JSONObject:
        return await self._send(_api.drain_node(node_id))

    async def create_tenant(self, name: str) -> JSONObject:
        return await self._send(_api.create_tenant(name))

    async def tenants(self) -> JSONObject:
        return await self._send(_api.list_tenants())

    async def get_tenant(self, tenant_id: str) -> JSONObject:
        return await self._send(_api.get_tenant(tenant_id))

    async def update_tenant(self, tenant_id: str, *, allow_process_tier: bool) -> JSONObject:
        return await self._send(
            _api.update_tenant(tenant_id, allow_process_tier=allow_process_tier)
        )

    async def create_api_key(self, tenant_id: str, *, admin: bool = False) -> JSONObject:
        return await self._send(_api.create_api_key(tenant_id, admin=admin))

    async def healthz(self) -> JSONObject:
        return await self._send(_api.healthz())
