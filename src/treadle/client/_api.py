"""The API operations as data, shared by the sync and the async client.

Each operation is a `Call`: what to send (method, path, query, JSON body) and how to turn
the response into a result. The two clients only move bytes; everything the API contract
says lives here once. Foreign exceptions (httpx, websockets) are translated here too.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Unpack
from urllib.parse import quote, urlencode

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from treadle.client.errors import TreadleAPIError, TreadleClientError, TreadleConnectionError

if TYPE_CHECKING:
    from treadle.domain.function import FunctionSpec

__all__ = [
    "POOL_LIMITS",
    "STREAM_ERRORS",
    "Call",
    "JSONObject",
    "api_error",
    "cancel",
    "connection_error",
    "create_api_key",
    "create_function",
    "create_tenant",
    "decode_stream_message",
    "delete_function",
    "drain_node",
    "get_execution",
    "get_function",
    "get_node",
    "get_tenant",
    "healthz",
    "invoke",
    "list_executions",
    "list_functions",
    "list_tenants",
    "nodes",
    "output",
    "output_stream_url",
    "parse_empty",
    "parse_object",
    "stream_error",
    "timeout_for",
    "tls_context",
    "update_tenant",
]


# Idle connections are dropped by the client well before Weaver closes them (30 s), so a
# request never goes out on a connection the server is closing at that instant.
@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client of this process, as httpx would make each: making one
    loads the CA bundle (~20 ms), which a client per sandbox would otherwise pay every time."""
    return httpx.create_ssl_context()


POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=15)

T = TypeVar("T")
JSONObject = dict[str, Any]
Params = dict[str, str | int | float | list[str]]

# Slack on top of `wait`: the server answers after up to `wait` seconds, then needs time to
# serialize and send; a read timeout equal to `wait` would race it.
_WAIT_SLACK_S = 15.0

# The codes the API documents per status, for error bodies that lack one (e.g. a proxy's page).
_DEFAULT_CODES = {
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
}
_MAX_TEXT_IN_MESSAGE = 500


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params = field(default_factory=dict)
    json: Any = None
    auth: bool = True
    # None keeps the client's default; otherwise the read timeout for this call alone.
    read_timeout: float | None = None


def timeout_for(call: Call[Any], default: httpx.Timeout) -> httpx.Timeout:
    if call.read_timeout is None:
        return default
    return httpx.Timeout(
        connect=default.connect, read=call.read_timeout, write=default.write, pool=default.pool
    )


# --- responses -------------------------------------------------------------------------


def api_error(status: int, body: bytes, reason: str = "") -> TreadleAPIError:
    """Build the error for a non-2xx answer, whatever its body looks like."""
    code = _DEFAULT_CODES.get(status, "server_error" if status >= 500 else "http_error")
    message = reason or f"HTTP {status}"
    details: Any = None
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
        text = body.decode("utf-8", errors="replace").strip()
        if text:
            message = text[:_MAX_TEXT_IN_MESSAGE]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or code)
            message = str(error.get("message") or message)
            details = error.get("details")
        elif isinstance(payload.get("detail"), str):
            # A framework default (e.g. FastAPI's {"detail": "..."}) that slipped through.
            message = payload["detail"]
    return TreadleAPIError(status, code, message, details)


def _raise_for_status(response: httpx.Response) -> None:
    if not response.is_success:
        response.read()
        raise api_error(response.status_code, response.content, response.reason_phrase)


def parse_object(response: httpx.Response) -> JSONObject:
    _raise_for_status(response)
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise TreadleAPIError(
            response.status_code,
            "invalid_response",
            f"expected a JSON object from {response.request.url.path}",
        )
    return payload


def parse_empty(response: httpx.Response) -> None:
    _raise_for_status(response)


def connection_error(url: str, exc: Exception) -> TreadleConnectionError:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return TreadleConnectionError(f"request to treadle at {url} timed out ({exc})", url=url)
    detail = str(exc) or type(exc).__name__
    return TreadleConnectionError(
        f"cannot reach treadle at {url} ({detail}); start one with `treadle up` "
        f"or point TREADLE_URL at a running Weaver",
        url=url,
    )


# --- functions -------------------------------------------------------------------------


def _segment(value: str) -> str:
    # Names and ids go into the path; never let one add a path segment or a query.
    return quote(value, safe="")


def create_function(spec: Mapping[str, Any] | FunctionSpec) -> Call[JSONObject]:
    body = dict(spec) if isinstance(spec, Mapping) else spec.model_dump(mode="json")
    return Call("POST", "/v1/functions", parse_object, json=body)


def list_functions() -> Call[JSONObject]:
    return Call("GET", "/v1/functions", parse_object)


def get_function(name: str, version: int | None = None) -> Call[JSONObject]:
    params: Params = {} if version is None else {"version": version}
    return Call("GET", f"/v1/functions/{_segment(name)}", parse_object, params=params)


def delete_function(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/functions/{_segment(name)}", parse_empty)


# --- executions ------------------------------------------------------------------------


def invoke(
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    stdin: str | None = None,
    idempotency_key: str | None = None,
    wait: float | None = None,
    version: int | None = None,
    strategy: str | None = None,
) -> Call[JSONObject]:
    body: JSONObject = {"args": dict(args or {})}
    if stdin is not None:
        body["stdin"] = stdin
    if strategy is not None:
        body["strategy"] = strategy
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    params: Params = {}
    if wait is not None:
        # Whole seconds as an int: a server that declares `wait: int` rejects "5.0".
        params["wait"] = int(wait) if float(wait).is_integer() else wait
    if version is not None:
        params["version"] = version
    return Call(
        "POST",
        f"/v1/functions/{_segment(name)}/invoke",
        parse_object,
        params=params,
        json=body,
        read_timeout=None if wait is None else wait + _WAIT_SLACK_S,
    )


def get_execution(execution_id: str) -> Call[JSONObject]:
    return Call("GET", f"/v1/executions/{_segment(execution_id)}", parse_object)


def list_executions(
    *,
    state: str | None = None,
    function: str | None = None,
    node_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Call[JSONObject]:
    filters = {"state": state, "function": function, "node_id": node_id, "cursor": cursor}
    params: Params = {key: value for key, value in filters.items() if value is not None}
    params["limit"] = limit
    return Call("GET", "/v1/executions", parse_object, params=params)


def placement(execution_id: str) -> Call[JSONObject]:
    return Call("GET", f"/v1/executions/{_segment(execution_id)}/placement", parse_object)


def cancel(execution_id: str) -> Call[JSONObject]:
    return Call("POST", f"/v1/executions/{_segment(execution_id)}/cancel", parse_object)


def output(execution_id: str, after_seq: int | None = None) -> Call[JSONObject]:
    params: Params = {} if after_seq is None else {"after_seq": after_seq}
    return Call(
        "GET", f"/v1/executions/{_segment(execution_id)}/output", parse_object, params=params
    )


def output_stream_url(base_url: str, execution_id: str, after_seq: int | None = None) -> str:
    """The WebSocket URL that follows an execution's output, under the same base URL."""
    url = httpx.URL(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    path = url.raw_path.decode("ascii").split("?")[0].rstrip("/")
    path += f"/v1/executions/{_segment(execution_id)}/output"
    if after_seq is not None:
        path += "?" + urlencode({"after_seq": after_seq})
    return str(url.copy_with(scheme=scheme, raw_path=path.encode("ascii")))


def decode_stream_message(raw: str | bytes, url: str) -> JSONObject:
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict) or message.get("type") not in ("chunk", "end"):
        raise TreadleConnectionError(
            f"unexpected frame on the output stream: {raw!r:.200}", url=url
        )
    return message


# What opening or reading the output WebSocket may raise (TimeoutError is an OSError).
STREAM_ERRORS = (WebSocketException, OSError)


def stream_error(url: str, exc: Exception | None = None) -> TreadleClientError:
    """Translate a failure to open or read the output WebSocket (None: it closed early)."""
    if exc is None:
        return TreadleConnectionError(
            f"the output stream from {url} closed before the execution ended", url=url
        )
    if isinstance(exc, InvalidStatus):
        # The handshake got a plain HTTP answer: the same error body as any other call.
        return api_error(
            exc.response.status_code, bytes(exc.response.body), exc.response.reason_phrase
        )
    if isinstance(exc, ConnectionClosed):
        return TreadleConnectionError(
            f"the output stream from {url} closed before the execution ended ({exc})", url=url
        )
    return connection_error(url, exc)


# --- nodes, tenants, health ------------------------------------------------------------


class UsageFilters(TypedDict, total=False):
    """What `GET /v1/usage` is asked for (see `Client.usage`)."""

    start: str | None
    end: str | None
    group_by: list[str] | None
    kind: str | None
    function: str | None
    sandbox: str | None
    node: str | None
    tenant: str | None
    labels: dict[str, str] | None


def usage(**asked: Unpack[UsageFilters]) -> Call[JSONObject]:
    """`GET /v1/usage` (see `Client.usage`)."""
    filters: dict[str, str | list[str] | None] = {
        "from": asked.get("start"),
        "to": asked.get("end"),
        "group_by": ",".join(asked.get("group_by") or []),
        "kind": asked.get("kind"),
        "function": asked.get("function"),
        "sandbox": asked.get("sandbox"),
        "node": asked.get("node"),
        "tenant": asked.get("tenant"),
        "label": [f"{key}={value}" for key, value in (asked.get("labels") or {}).items()],
    }
    params: Params = {key: value for key, value in filters.items() if value}
    return Call("GET", "/v1/usage", parse_object, params=params)


def nodes() -> Call[JSONObject]:
    return Call("GET", "/v1/nodes", parse_object)


def get_node(node_id: str) -> Call[JSONObject]:
    return Call("GET", f"/v1/nodes/{_segment(node_id)}", parse_object)


def drain_node(node_id: str) -> Call[JSONObject]:
    return Call("POST", f"/v1/nodes/{_segment(node_id)}/drain", parse_object)


def create_tenant(name: str) -> Call[JSONObject]:
    return Call("POST", "/v1/tenants", parse_object, json={"name": name})


def list_tenants() -> Call[JSONObject]:
    return Call("GET", "/v1/tenants", parse_object)


def get_tenant(tenant_id: str) -> Call[JSONObject]:
    return Call("GET", f"/v1/tenants/{_segment(tenant_id)}", parse_object)


def update_tenant(tenant_id: str, *, allow_process_tier: bool) -> Call[JSONObject]:
    return Call(
        "PATCH",
        f"/v1/tenants/{_segment(tenant_id)}",
        parse_object,
        json={"allow_process_tier": allow_process_tier},
    )


def create_api_key(tenant_id: str, *, admin: bool = False) -> Call[JSONObject]:
    return Call(
        "POST", f"/v1/tenants/{_segment(tenant_id)}/keys", parse_object, json={"admin": admin}
    )


def healthz() -> Call[JSONObject]:
    return Call("GET", "/healthz", parse_object, auth=False)
