"""The blocking client: `Client`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import httpx

from treadle.client import _api, _map
from treadle.client._api import Call, JSONObject
from treadle.client.config import ClientConfig, load_config
from treadle.client.errors import TreadleConnectionError

if TYPE_CHECKING:
    from treadle.domain.function import FunctionSpec

__all__ = ["DEFAULT_TIMEOUT", "Client", "Function"]

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# How long opening the output WebSocket may take; reading from it has no timeout, since an
# execution may stay silent for as long as its timeout allows (pings keep the link alive).
STREAM_OPEN_TIMEOUT_S = 10.0


class Client:
    """A blocking client for the treadle REST API.

    Settings not given here come from the environment (see `treadle.client.config`).
    Every method returns the API's JSON as plain dicts, and raises `TreadleAPIError` for a
    non-2xx answer and `TreadleConnectionError` when the API cannot be reached.

        with Client() as treadle:
            treadle.create_function({"name": "add", "command": ["python3", "-c", "print(4 + 9)"]})
            execution = treadle.invoke("add", wait=30)
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config: ClientConfig = load_config(url, api_key)
        self._timeout = httpx.Timeout(timeout)
        self._http = httpx.Client(
            base_url=self.config.url,
            timeout=self._timeout,
            transport=transport,
            limits=_api.POOL_LIMITS,
            verify=_api.tls_context(),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _headers(self, call: Call[Any]) -> dict[str, str]:
        if not call.auth:
            return {}
        return {"Authorization": f"Bearer {self.config.require_api_key()}"}

    def _send(self, call: Call[T]) -> T:
        timeout = _api.timeout_for(call, self._timeout)
        try:
            response = self._http.request(
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

    def create_function(self, spec: Mapping[str, Any] | FunctionSpec) -> JSONObject:
        return self._send(_api.create_function(spec))

    def list_functions(self) -> JSONObject:
        return self._send(_api.list_functions())

    def get_function(self, name: str, version: int | None = None) -> JSONObject:
        return self._send(_api.get_function(name, version))

    def delete_function(self, name: str) -> None:
        self._send(_api.delete_function(name))

    # executions

    def invoke(
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
        """Start an execution; with `wait`, block up to that many seconds for it to end."""
        call = _api.invoke(
            name,
            args,
            stdin=stdin,
            idempotency_key=idempotency_key,
            wait=wait,
            version=version,
            strategy=strategy,
        )
        return self._send(call)

    def get_execution(self, execution_id: str) -> JSONObject:
        return self._send(_api.get_execution(execution_id))

    # batches (map)

    def function(self, name: str) -> Function:
        """A handle on the function `name`: `invoke`, `map`, `map_unordered`."""
        return Function(self, name)

    def map(
        self,
        name: str,
        inputs: Iterable[Mapping[str, Any]],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        batch_size: int = _map.DEFAULT_BATCH_SIZE,
        version: int | None = None,
        strategy: str | None = None,
    ) -> Iterator[Any]:
        """Run `name` once per args object of `inputs`, yielding each execution (a dict, its
        `state` `success` or `failure`) once it ends: in the order of `inputs`, or, with
        `ordered=False`, in the order they end. An input the server refuses (invalid, past a
        quota) raises its `TreadleAPIError`, or is yielded as one with `return_exceptions`.

        Inputs go `batch_size` at a time, the next batch sent while the last one runs."""
        chunks = _map.batches(inputs, batch_size)
        ahead = self._submit(name, next(chunks, None), version, strategy)
        offset = 0
        while ahead is not None:
            current = ahead
            ahead = self._submit(name, next(chunks, None), version, strategy)
            yield from self._gather(current, ordered, return_exceptions, offset)
            offset += current["size"]

    def get_batch(
        self, batch_id: str, cursor: str | None = None, limit: int = 100, wait: float | None = None
    ) -> JSONObject:
        """A batch with a page of its items by index: `{"id", "size", "counts", "done",
        "items": [{"index", "execution", "error"}], "next_cursor"}`; with `wait`, once the
        page's items have ended or that many seconds passed."""
        return self._send(_map.get_batch(batch_id, cursor=cursor, limit=limit, wait=wait))

    def _submit(
        self, name: str, items: list[JSONObject] | None, version: int | None, strategy: str | None
    ) -> JSONObject | None:
        if items is None:
            return None
        call = _map.map_batch(
            name, items, idempotency_key=_map.new_key(), version=version, strategy=strategy
        )
        for attempt in range(_map.MAX_REOPEN + 1):
            try:
                return self._send(call)
            except TreadleConnectionError:
                if attempt == _map.MAX_REOPEN:
                    raise
        raise AssertionError("unreachable")

    def _gather(
        self, batch: JSONObject, ordered: bool, return_exceptions: bool, offset: int
    ) -> Iterator[Any]:
        from websockets.sync.client import connect

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
                with connect(
                    url,
                    additional_headers=headers,
                    open_timeout=STREAM_OPEN_TIMEOUT_S,
                    max_size=None,
                ) as websocket:
                    for raw in websocket:
                        yield from gather.take(raw)
                        if gather.ended:
                            return
            except _api.STREAM_ERRORS as exc:
                breaks += 1
                if breaks > _map.MAX_REOPEN:
                    raise _api.stream_error(url, exc) from exc

    def list_executions(
        self,
        state: str | None = None,
        function: str | None = None,
        node_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JSONObject:
        """One page, newest first: `{"items": [...], "next_cursor": str | None}`."""
        call = _api.list_executions(
            state=state, function=function, node_id=node_id, limit=limit, cursor=cursor
        )
        return self._send(call)

    def iter_executions(
        self,
        state: str | None = None,
        function: str | None = None,
        node_id: str | None = None,
        page_size: int = 100,
    ) -> Iterator[JSONObject]:
        """Every matching execution, newest first, fetching pages as it goes."""
        cursor: str | None = None
        while True:
            page = self.list_executions(state, function, node_id, page_size, cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def placement(self, execution_id: str) -> JSONObject:
        """Where the execution was placed and why (scores per criterion, rejections)."""
        return self._send(_api.placement(execution_id))

    def cancel(self, execution_id: str) -> JSONObject:
        return self._send(_api.cancel(execution_id))

    def output(self, execution_id: str, after_seq: int | None = None) -> JSONObject:
        return self._send(_api.output(execution_id, after_seq))

    def follow(self, execution_id: str, after_seq: int | None = None) -> Iterator[JSONObject]:
        """Stream the output live: `chunk` messages, then one `end` message with the execution.

        Raises `TreadleConnectionError` when the stream cannot be opened or breaks off before
        `end`; resume with `after_seq` set to the last chunk's `seq`.
        """
        from websockets.sync.client import connect

        url = _api.output_stream_url(self.config.url, execution_id, after_seq)
        headers = {"Authorization": f"Bearer {self.config.require_api_key()}"}
        try:
            websocket = connect(
                url,
                additional_headers=headers,
                open_timeout=STREAM_OPEN_TIMEOUT_S,
                max_size=None,
            )
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc
        with websocket:
            try:
                for raw in websocket:
                    message = _api.decode_stream_message(raw, url)
                    yield message
                    if message["type"] == "end":
                        return
            except _api.STREAM_ERRORS as exc:
                raise _api.stream_error(url, exc) from exc
        raise _api.stream_error(url)

    # nodes, tenants, health

    def usage(self, **filters: Unpack[_api.UsageFilters]) -> JSONObject:
        """What work used and cost over [`start`, `end`) (ISO 8601; default the last day), summed
        per group (`group_by`: tenant, kind, function, sandbox, node, hour, day, or
        `label:KEY`), of the sandboxes with all of `labels` in their metadata where given:
        `{"from", "to", "group_by", "groups": [{"key", "records", "cost", "cpu_s", …}],
        "totals"}`. See docs/metering.md."""
        return self._send(_api.usage(**filters))

    def nodes(self) -> JSONObject:
        return self._send(_api.nodes())

    def get_node(self, node_id: str) -> JSONObject:
        return self._send(_api.get_node(node_id))

    def drain_node(self, node_id: str) -> JSONObject:
        return self._send(_api.drain_node(node_id))

    def create_tenant(self, name: str) -> JSONObject:
        """Create a tenant: `{"tenant": {"id", "name", …}, "api_key": "tk_…"}` (shown once)."""
        return self._send(_api.create_tenant(name))

    def tenants(self) -> JSONObject:
        """`{"items": [tenant, …], "next_cursor": None}`; a tenant is `{"id", "name",
        "created_at", "allow_process_tier"}`."""
        return self._send(_api.list_tenants())

    def get_tenant(self, tenant_id: str) -> JSONObject:
        return self._send(_api.get_tenant(tenant_id))

    def update_tenant(self, tenant_id: str, *, allow_process_tier: bool) -> JSONObject:
        """Allow or deny the tenant the `process` tier, which isolates nothing."""
        return self._send(_api.update_tenant(tenant_id, allow_process_tier=allow_process_tier))

    def create_api_key(self, tenant_id: str, *, admin: bool = False) -> JSONObject:
        return self._send(_api.create_api_key(tenant_id, admin=admin))

    def healthz(self) -> JSONObject:
        return self._send(_api.healthz())


class Function:
    """A function by name, as `Client.function` gives it."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def invoke(
        self, args: Mapping[str, Any] | None = None, *, wait: float | None = None, **options: Any
    ) -> JSONObject:
        return self.client.invoke(self.name, args, wait=wait, **options)

    def map(self, inputs: Iterable[Mapping[str, Any]], **options: Any) -> Iterator[Any]:
        """`Client.map`: results in the order of `inputs`."""
        return self.client.map(self.name, inputs, ordered=True, **options)

    def map_unordered(self, inputs: Iterable[Mapping[str, Any]], **options: Any) -> Iterator[Any]:
        """`Client.map` with results in the order they end."""
        return self.client.map(self.name, inputs, ordered=False, **options)
