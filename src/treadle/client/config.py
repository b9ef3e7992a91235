"""Where the SDK and the CLI find the API: its URL and an API key (DESIGN §7 conventions).

Each setting comes from the first of: an explicit argument, the environment
(`TREADLE_URL`, `TREADLE_API_KEY`), and, for the key only, the admin key that `treadle up`
writes to `$TREADLE_HOME/admin.key`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from treadle.client.errors import TreadleConfigError

__all__ = [
    "DEFAULT_URL",
    "ClientConfig",
    "admin_key_path",
    "load_config",
    "treadle_home",
]

DEFAULT_URL = "http://127.0.0.1:8700"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Resolved connection settings. `api_key` is None when none was found anywhere."""

    url: str
    api_key: str | None
    key_file: Path

    def require_api_key(self) -> str:
        if self.api_key is None:
            raise TreadleConfigError(
                f"no API key: pass --api-key, set TREADLE_API_KEY, or run `treadle up`, "
                f"which writes the admin key to {self.key_file}"
            )
        return self.api_key

    def __repr__(self) -> str:
        # Keys end up in logs and tracebacks through reprs; never show one.
        key = "None" if self.api_key is None else "'***'"
        return f"ClientConfig(url={self.url!r}, api_key={key}, key_file={str(self.key_file)!r})"


def treadle_home(env: Mapping[str, str] | None = None) -> Path:
    """`$TREADLE_HOME`, else `$XDG_DATA_HOME/treadle`, else `~/.local/share/treadle`."""
    env = os.environ if env is None else env
    if home := env.get("TREADLE_HOME"):
        return Path(home).expanduser()
    if data_home := env.get("XDG_DATA_HOME"):
        return Path(data_home).expanduser() / "treadle"
    return Path.home() / ".local" / "share" / "treadle"


def admin_key_path(env: Mapping[str, str] | None = None) -> Path:
    return treadle_home(env) / "admin.key"


def load_config(
    url: str | None = None,
    api_key: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Resolve the settings. A missing key is not an error here: `/healthz` needs none, so
    the error is raised by `ClientConfig.require_api_key` when a call needs the key."""
    env = os.environ if env is None else env
    key_file = admin_key_path(env)
    resolved_url = url or env.get("TREADLE_URL") or DEFAULT_URL
    resolved_key = api_key or env.get("TREADLE_API_KEY") or _read_key_file(key_file)
    return ClientConfig(url=resolved_url.rstrip("/"), api_key=resolved_key, key_file=key_file)


def _read_key_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TreadleConfigError(f"cannot read the API key file {path}: {exc}") from exc
    return text.strip() or None
