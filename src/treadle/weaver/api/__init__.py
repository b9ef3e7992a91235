"""REST and WebSocket API under /v1 (FastAPI)."""
