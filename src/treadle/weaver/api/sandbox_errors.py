"""How a sandbox's refusals read as API errors: the errno name the guest agent gave (a file
that is not there, a user the sandbox does not have, a full disk) to the status a client acts
on. Exec, files and processes all answer through this one table."""

from __future__ import annotations

from typing import Any

from treadle.domain import errors
from treadle.weaver.services.streams import Ended

__all__ = ["sandbox_error"]

_ERRORS: dict[str, type[errors.TreadleError]] = {
    "ENOENT": errors.NotFound,
    "ESRCH": errors.NotFound,
    "EEXIST": errors.Conflict,
    "ENOTEMPTY": errors.Conflict,
    "EBUSY": errors.Conflict,
    "EACCES": errors.Forbidden,
    "EPERM": errors.Forbidden,
    "EROFS": errors.Forbidden,
    "ENOSPC": errors.InsufficientStorage,
    "EDQUOT": errors.InsufficientStorage,
    "EFBIG": errors.InsufficientStorage,
}


def sandbox_error(
    ended: Ended,
    details: dict[str, Any],
    quota_mib: int | None = None,
    *,
    prefix: str = "",
    otherwise: type[errors.TreadleError] = errors.Unavailable,
) -> errors.TreadleError:
    """The error for a stream that ended with `ended.error`: its errno's, a 400 for any other
    errno the sandbox named, and `otherwise` where it named none (by default 503: the node
    or its link failed)."""
    code = ended.error_code
    cls = _ERRORS.get(code or "", errors.InvalidRequest if code else otherwise)
    message = f"{prefix}{ended.error}"
    details = {**details, "errno": code}
    if cls is errors.InsufficientStorage:
        details["quota_mib"] = quota_mib
        message += f" (the sandbox's disk quota is {quota_mib} MiB)"
    return cls(message, details=details)
