"""treadle: run other people's code safely on a fleet of machines.

`from treadle import Sandbox` (or `AsyncSandbox`) for the sandbox SDK. They are imported on
first use, so that `import treadle` stays cheap (not even `typing`) for the servers, the
guest agent and the CLI.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from treadle.client import AsyncSandbox, Sandbox

__version__ = "0.1.0"
__all__ = ["AsyncSandbox", "Sandbox", "__version__"]


def __getattr__(name: str) -> object:
    if name in ("Sandbox", "AsyncSandbox"):
        import treadle.client

        return getattr(treadle.client, name)
    raise AttributeError(f"module 'treadle' has no attribute {name!r}")
