"""Who may reach a sandbox's ports without an API key: the holder of its access token, or
of a URL signed with it that has not expired.

A signature is HMAC-SHA256, keyed by the sandbox's access token, over the sandbox, the port
(or another scope: a desktop viewer's, say) and the expiry: a URL opens one port of one
sandbox until it expires, and every URL signed for a sandbox dies with its token. Nothing is
stored per URL, and every replica checks one the same way.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["MAX_EXPIRY_S", "sign", "valid_signature", "valid_token"]

MAX_EXPIRY_S = 7 * 24 * 3600.0


def sign(access_token: str, sandbox_id: str, port: int | str, expires: int) -> str:
    message = f"{sandbox_id}:{port}:{expires}".encode()
    return hmac.new(access_token.encode(), message, hashlib.sha256).hexdigest()


def valid_signature(
    access_token: str | None,
    sandbox_id: str,
    port: int | str,
    expires: str | None,
    signature: str | None,
    now: float,
) -> bool:
    if not access_token or not expires or not signature:
        return False
    # ASCII digits only, and few: `int` takes "²" and a thousand digits alike.
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        return False
    if int(expires) < now:
        return False
    expected = sign(access_token, sandbox_id, port, int(expires))
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def valid_token(access_token: str | None, offered: str | None) -> bool:
    return (
        bool(access_token)
        and bool(offered)
        and hmac.compare_digest(str(access_token).encode(), str(offered).encode())
    )
