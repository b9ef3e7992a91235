"""Where Shuttle keeps what outlives one workload on this machine: OCI runtimes' state and
bundles, the image cache, owner tokens.

Not a shared temporary directory: there any local user can create the directory first, or
swap a part of it for a link, and Shuttle, as root, would then write bundles and run
containers from a tree that user controls. So the root is `/var/lib/treadle` for a root
Shuttle (a per-user directory under the temporary directory otherwise), and every directory
on the way is checked, without following links, to be this user's and writable by nobody
else (`private_dir`): a Shuttle refuses to start on one that is not.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["private_dir", "state_root"]


def state_root() -> Path:
    if os.geteuid() == 0:
        return private_dir(Path("/var/lib/treadle"))
    return private_dir(Path(tempfile.gettempdir()) / f"treadle-{os.geteuid()}")


def private_dir(path: Path, mode: int = 0o711) -> Path:
    """`path`, made if missing, once it is a directory (not a link) of this user that no one
    else may write to; raises PermissionError when it is not."""
    try:
        path.mkdir(mode=mode, parents=False)
        os.chmod(path, mode)  # whatever the umask: sandboxes' users pass through some of these
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return private_dir(path, mode)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode):
        raise PermissionError(f"{path} is not a directory (a link?): refusing to keep state there")
    if found.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {found.st_uid}: refusing to keep state there")
    if found.st_mode & 0o022:
        raise PermissionError(f"{path} is writable by others: refusing to keep state there")
    return path
