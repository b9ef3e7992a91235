"""The node credential Weaver hands out on first registration, kept in `home/node.json`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CREDENTIAL_FILE", "NodeCredential", "load_credential", "save_credential"]

CREDENTIAL_FILE = "node.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeCredential:
    node_id: str
    node_secret: str

    def __repr__(self) -> str:
        return f"NodeCredential(node_id={self.node_id!r}, node_secret=<hidden>)"

    @property
    def bearer(self) -> str:
        return f"{self.node_id}:{self.node_secret}"


def load_credential(home: Path) -> NodeCredential | None:
    """The stored credential, or None when there is none or it is unreadable (then the join
    token, if any, registers the node again and a fresh credential replaces the file)."""
    path = home / CREDENTIAL_FILE
    try:
        raw = json.loads(path.read_bytes())
        return NodeCredential(node_id=str(raw["node_id"]), node_secret=str(raw["node_secret"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable node credential %s: %s", path, exc)
        return None


def save_credential(home: Path, credential: NodeCredential) -> None:
    """Write the credential atomically with mode 0600: a crash leaves the old file or the new
    one, never a torn one, and the secret is never readable by others, not even briefly."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CREDENTIAL_FILE
    tmp = home / f".{CREDENTIAL_FILE}.{os.getpid()}.tmp"
    body = json.dumps({"node_id": credential.node_id, "node_secret": credential.node_secret})
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
