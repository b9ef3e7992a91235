"""The state shared by every command: the global options and the client made from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from treadle.client import Client

__all__ = ["CLIState", "client_from"]


@dataclass
class CLIState:
    url: str | None = None
    api_key: str | None = None
    _client: Client | None = field(default=None, repr=False)

    def client(self) -> Client:
        # Made on first use: `treadle --help` and the server commands never pay for httpx.
        if self._client is None:
            from treadle.client import Client

            self._client = Client(self.url, self.api_key)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def client_from(ctx: typer.Context) -> Client:
    state = ctx.find_object(CLIState)
    if state is None:  # a command invoked without the root callback (embedding, tests)
        state = ctx.ensure_object(CLIState)
        ctx.call_on_close(state.close)
    return state.client()
