"""The ASGI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from treadle import __version__
from treadle.weaver.api import (
    agent,
    batches,
    e2b,
    executions,
    functions,
    nodes,
    sandbox_desktop,
    sandbox_files,
    sandbox_ports,
    sandbox_processes,
    sandboxes,
    usage,
)
from treadle.weaver.api.deps import admin_of
from treadle.weaver.api.errors import install_error_handlers
from treadle.weaver.api.host_routing import HostRouting
from treadle.weaver.api.limits import RequestGuard
from treadle.weaver.api.request_metrics import RequestMetrics
from treadle.weaver.core import Weaver
from treadle.weaver.envd.app import EnvdRouting
from treadle.weaver.metrics import CONTENT_TYPE
from treadle.weaver.settings import WeaverSettings

__all__ = ["create_app"]


def create_app(settings: WeaverSettings, weaver: Weaver | None = None) -> FastAPI:
    core = weaver or Weaver(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await core.start()
        app.state.weaver = core
        try:
            yield
        finally:
            await core.stop()

    app = FastAPI(
        title="treadle",
        version=__version__,
        description="Run other people's code safely on a fleet of machines.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=core.metrics)
    if settings.sandbox_domain:
        # Outside them: the guard and the routes see the path it maps the host name to.
        app.add_middleware(HostRouting, domain=settings.sandbox_domain)
    # Outermost: envd's requests (the e2b SDK's, naming a sandbox) never reach the API's.
    app.add_middleware(EnvdRouting, weaver=core)
    routers = (
        functions,
        batches,
        executions,
        sandboxes,
        sandbox_files,
        sandbox_processes,
        sandbox_ports,
        sandbox_desktop,
        nodes,
        usage,
        agent,
        e2b,
    )
    for module in routers:
        app.include_router(module.router)
    if (settings.novnc_dir / "core" / "rfb.js").is_file():
        app.mount(
            sandbox_desktop.NOVNC_PATH,
            StaticFiles(directory=settings.novnc_dir),
            name="novnc",
        )

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        """Weaver's metrics in Prometheus' text format; an admin key unless
        `TREADLE_METRICS_PUBLIC` (a scraper sends it as a bearer token)."""
        if not settings.metrics_public:
            await admin_of(request)
        await core.metrics.refresh(core)
        return Response(core.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz", tags=["health"], summary="Liveness")
    async def healthz() -> Any:
        # `leader`: whether this replica is the one reconciling the fleet now.
        return {"status": "ok", "version": __version__, "leader": core.leads}

    return app
