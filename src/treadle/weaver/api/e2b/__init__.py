"""The E2B-compatible surface (DESIGN §11): E2B's control-plane REST routes and envd's
`/health`, so that the stock `e2b` SDK works against Weaver with `E2B_API_URL`,
`E2B_SANDBOX_URL` and `E2B_API_KEY` set. The wire facts are listed in docs/e2b.md."""

from __future__ import annotations

from fastapi import APIRouter

from treadle.weaver.api.e2b import control, health

__all__ = ["router"]

router = APIRouter()
# envd's /health first: the control plane's catch-all answers only what nothing else does.
router.include_router(health.router)
router.include_router(control.router)
