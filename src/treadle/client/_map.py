"""Batch invoke (map) for both clients: the calls, and what turns a batch's results into
what `map` yields. The clients only move bytes and run the loop.

An iterable is sent as batches of at most `batch_size` items, each with an idempotency key of
its own, so a request retried after a lost answer makes nothing twice; the results come over
`/v1/batches/{id}/results`, which, reopened after a break, sends every ended item again
(`Gather` takes each once).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from treadle.client._api import Call, JSONObject, Params, parse_object
from treadle.client.errors import TreadleAPIError, TreadleConnectionError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MAX_REOPEN",
    "Gather",
    "batches",
    "get_batch",
    "map_batch",
    "results_url",
]

# Items per request: well under the server's default limit (10,000) and body size (8 MiB)
# for args of a few hundred bytes each.
DEFAULT_BATCH_SIZE = 1000
# How often a results stream that broke off is opened again before `map` gives up.
MAX_REOPEN = 3
# What status an item's refusal would have had as a request of its own.
_STATUS = {
    "validation_error": 422,
    "invalid_request": 422,
    "payload_too_large": 413,
    "limit_exceeded": 429,
    "not_found": 404,
}


def map_batch(
    name: str,
    items: list[JSONObject],
    *,
    idempotency_key: str,
    version: int | None = None,
    strategy: str | None = None,
) -> Call[JSONObject]:
    body: JSONObject = {"items": items, "idempotency_key": idempotency_key}
    if strategy is not None:
        body["strategy"] = strategy
    params: Params = {"limit": 1} if version is None else {"limit": 1, "version": version}
    return Call(
        "POST", f"/v1/functions/{quote(name, safe='')}/map", parse_object, params=params, json=body
    )


def get_batch(
    batch_id: str, *, cursor: str | None = None, limit: int = 100, wait: float | None = None
) -> Call[JSONObject]:
    params: Params = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    if wait is not None:
        params["wait"] = int(wait) if float(wait).is_integer() else wait
    return Call(
        "GET",
        f"/v1/batches/{quote(batch_id, safe='')}",
        parse_object,
        params=params,
        read_timeout=None if wait is None else wait + 15.0,
    )


def results_url(base_url: str, batch_id: str) -> str:
    url = httpx.URL(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    path = url.raw_path.decode("ascii").split("?")[0].rstrip("/")
    path += f"/v1/batches/{quote(batch_id, safe='')}/results"
    return str(url.copy_with(scheme=scheme, raw_path=path.encode("ascii")))


def batches(inputs: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[JSONObject]]:
    """`inputs` (each an args object) as the items of successive batches."""
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    iterator = iter(inputs)
    while chunk := list(itertools.islice(iterator, size)):
        yield [{"args": dict(args)} for args in chunk]


def new_key() -> str:
    return f"map-{uuid.uuid4()}"


class Gather:
    """The results of one batch, from its stream's messages: each item once, in the order
    asked (`ordered`: by index, held back until those before it came), as the execution
    dict, or the item's refusal as a `TreadleAPIError` (raised, unless `return_exceptions`)."""

    def __init__(
        self, size: int, *, ordered: bool, return_exceptions: bool, url: str, offset: int = 0
    ) -> None:
        self.size = size
        self._offset = offset  # where the batch's first input stands among all of them
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._url = url
        self._seen: set[int] = set()
        self._held: dict[int, Any] = {}
        self._next = 0
        self.ended = False

    def take(self, raw: str | bytes) -> list[Any]:
        """What `map` yields now, given one more message of the stream."""
        message = _decode(raw, self._url)
        if message["type"] == "end":
            self.ended = True
            if len(self._seen) < self.size:
                raise TreadleConnectionError(
                    f"the results of {self._url} ended with {len(self._seen)} of {self.size}",
                    url=self._url,
                )
            return []
        items = message.get("items")
        ready = []
        for item in items if isinstance(items, list) else []:
            index = item.get("index") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < self.size or index in self._seen:
                continue  # sent again after a reopen
            self._seen.add(index)
            value = self._value(item)
            if self._ordered:
                self._held[index] = value
            else:
                ready.append(value)
        while self._next in self._held:
            ready.append(self._held.pop(self._next))
            self._next += 1
        return ready

    @property
    def complete(self) -> bool:
        return len(self._seen) >= self.size

    def _value(self, message: JSONObject) -> Any:
        error = message.get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or "error")
            refused = TreadleAPIError(
                _STATUS.get(code, 400), code, str(error.get("message")), error.get("details")
            )
            if not self._return_exceptions:
                raise refused
            return refused
        execution = message.get("execution")
        if isinstance(execution, dict):
            # Its input's place among all those given to `map`, whatever batch it went in.
            execution["index"] = self._offset + int(message.get("index") or 0)
        return execution


def _decode(raw: str | bytes, url: str) -> JSONObject:
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if (
        isinstance(message, dict)
        and isinstance(message.get("error"), dict)
        and "type" not in message
    ):
        error = message["error"]
        code = str(error.get("code") or "error")
        raise TreadleAPIError(_STATUS.get(code, 400), code, str(error.get("message")), None)
    if not isinstance(message, dict) or message.get("type") not in ("results", "end"):
        raise TreadleConnectionError(f"unexpected frame on {url}: {raw!r:.200}", url=url)
    return message
