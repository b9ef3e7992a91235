"""Run Weaver under uvicorn."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn

from treadle import serving
from treadle.weaver.api.app import create_app
from treadle.weaver.core import Weaver
from treadle.weaver.settings import WeaverSettings

__all__ = ["serve"]


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets=sockets)  # type: ignore[arg-type]
        serving.settle_heap()  # the app and Weaver's services, built while starting
        if self._on_ready is not None and self.started:
            self._on_ready()


async def serve(
    settings: WeaverSettings,
    on_ready: Callable[[], None] | None = None,
    weaver: Weaver | None = None,
) -> None:
    """Serve until cancelled or signalled; `on_ready` runs once the port is listening."""
    config = uvicorn.Config(
        create_app(settings, weaver),
        host=settings.host,
        port=settings.port,
        loop="none",  # the caller's: `treadle.serving.run` picks it
        http="httptools",
        ws="websockets-sansio",
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        ws_max_size=16 * 1024 * 1024,
        # Longer than clients keep idle connections (the SDK: 15 s), so it is always the
        # client that closes one: a request can then never race the server's close.
        timeout_keep_alive=30,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )
    await _Server(config, on_ready).serve()
