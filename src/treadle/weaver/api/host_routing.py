"""Ports by host name: with `sandbox_domain` set, a request for `{port}-{id}.{domain}` (a
wildcard DNS name pointing at Weaver) is the request for `/v1/sandboxes/sbx_{id}/ports/{port}`
followed by its own path, so a web app in a sandbox sees the paths it serves, from `/`,
rather than under a prefix. Access is the port's (`port_auth`), unchanged.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["HOST_ROUTED", "HostRouting", "host_for"]

# Set on a request that came by host name (its cookies and prefix then start at `/`).
HOST_ROUTED = "treadle.host_routed"


def host_for(domain: str, sandbox_id: str, port: int) -> str:
    return f"{port}-{sandbox_id.removeprefix('sbx_')}.{domain}"


class HostRouting:
    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self._host = re.compile(
            rf"^([0-9]{{1,5}})-([a-z0-9]{{1,60}})\.{re.escape(domain)}(?::[0-9]{{1,5}})?$"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v for k, v in scope["headers"] if k == b"host"), b"")
            routed = self._host.match(host.decode("latin-1").lower())
            if routed is not None:
                prefix = f"/v1/sandboxes/sbx_{routed.group(2)}/ports/{routed.group(1)}"
                path = scope["path"] if scope["path"].startswith("/") else "/" + scope["path"]
                raw = scope.get("raw_path") or path.encode()
                scope = dict(
                    scope,
                    path=prefix + path,
                    raw_path=prefix.encode() + raw,
                    **{HOST_ROUTED: True},
                )
        await self.app(scope, receive, send)
