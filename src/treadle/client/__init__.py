"""The Python SDK for treadle: `Client` (blocking) and `AsyncClient` (asyncio).

from treadle.client import Client

with Client() as treadle:  # TREADLE_URL / TREADLE_API_KEY / the `treadle up` admin key
    treadle.create_function({"name": "add", "command": ["python3", "-c", "print(4 + 9)"]})
    print(treadle.invoke("add", wait=30)["state"])

Sandboxes have their own classes, `Sandbox` and `AsyncSandbox` (docs/sdk-sandboxes.md).
"""

from treadle.client._async import AsyncClient
from treadle.client._async_sandbox import AsyncSandbox, AsyncSandboxFiles, AsyncSandboxProcess
from treadle.client._sandbox_api import ExecResult
from treadle.client._sync import DEFAULT_TIMEOUT, Client, Function
from treadle.client.config import DEFAULT_URL, ClientConfig, load_config
from treadle.client.errors import (
    TreadleAPIError,
    TreadleClientError,
    TreadleConfigError,
    TreadleConnectionError,
)
from treadle.client.sandbox import Sandbox, SandboxFiles, SandboxProcess

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "AsyncClient",
    "AsyncSandbox",
    "AsyncSandboxFiles",
    "AsyncSandboxProcess",
    "Client",
    "ClientConfig",
    "ExecResult",
    "Function",
    "Sandbox",
    "SandboxFiles",
    "SandboxProcess",
    "TreadleAPIError",
    "TreadleClientError",
    "TreadleConfigError",
    "TreadleConnectionError",
    "load_config",
]
