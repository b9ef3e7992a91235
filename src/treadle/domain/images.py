"""Image references: the one grammar by which Weaver accepts a function's `image` and Shuttle
reads the image it is told to run, so that both read the same string the same way.

A reference names an image in a registry and nothing else::

    [host[:port]/]path[:tag][@sha256:<64 hex>]

- `host` is DNS labels (letters, digits, inner `-`) joined by `.`, or `localhost`; it is told
  from the first path component by containing a `.` or a `:port`, or by being `localhost`
  (as Docker does). A host named like a transport (`oci:…`, `dir:…`, `docker:…`) is refused,
  so that no tool can read the reference as a transport and a path.
- `path` is `/`-separated components of lower-case letters and digits, joined inside by `.`,
  `_`, `__` or dashes; so no component is empty, `.` or `..`.
- `host` and `path` together are at most MAX_NAME_LENGTH characters; a tag at most
  MAX_TAG_LENGTH (`[A-Za-z0-9_][A-Za-z0-9_.-]*`); `port` is 1 to 65535.

Transports (`docker://`, `oci:`), layout directories and other paths are not references:
they would name files on the node's own disk, or leave the choice of transport to the tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_REFERENCE_LENGTH",
    "MAX_TAG_LENGTH",
    "ImageName",
    "ImageReferenceError",
    "is_tag",
    "parse_image",
]

MAX_NAME_LENGTH = 255
MAX_TAG_LENGTH = 128
_DIGEST_LENGTH = len("sha256:") + 64
MAX_REFERENCE_LENGTH = MAX_NAME_LENGTH + 1 + MAX_TAG_LENGTH + 1 + _DIGEST_LENGTH

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"(?P<host>{_LABEL}(?:\.{_LABEL})*)(?::(?P<port>[0-9]{{1,5}}))?")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_TAG_LENGTH - 1}}}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# skopeo's transports (containers-transports(5)): a host of that name reads as one.
_TRANSPORTS = frozenset(
    {
        "containers-storage",
        "dir",
        "docker",
        "docker-archive",
        "docker-daemon",
        "oci",
        "oci-archive",
        "ostree",
        "sif",
        "tarball",
    }
)


class ImageReferenceError(ValueError):
    """Not a registry reference; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageName:
    """A parsed reference. `registry` is `host[:port]`, None when the reference names none
    (the tool's default registry applies); `repository` is the path."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`[registry/]repository`, as written."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository


def is_tag(text: str) -> bool:
    return _TAG.fullmatch(text) is not None


def parse_image(reference: str) -> ImageName:
    """The parts of `reference`, or ImageReferenceError when it is not one."""
    if not reference:
        raise ImageReferenceError("empty image reference")
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise ImageReferenceError(f"longer than {MAX_REFERENCE_LENGTH} characters")
    if "://" in reference:
        raise ImageReferenceError("a transport prefix is not part of a registry reference")
    rest, at, digest = reference.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise ImageReferenceError(f"invalid digest {digest!r} (expected sha256:<64 hex>)")
    name, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ImageReferenceError(
                f"invalid tag {tag[: MAX_TAG_LENGTH + 1]!r} (at most {MAX_TAG_LENGTH} of "
                "letters, digits, '_', '.', '-', not starting with '.' or '-')"
            )
    if len(name) > MAX_NAME_LENGTH:
        raise ImageReferenceError(f"the name is longer than {MAX_NAME_LENGTH} characters")
    registry: str | None = None
    first, slash, path = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry = _registry(first)
    else:
        path = name
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise ImageReferenceError(
                f"invalid path component {component[:64]!r} (lower-case letters and digits, "
                "separated inside by '.', '_', '__' or '-')"
            )
    return ImageName(registry, path, tag, digest if at else None)


def _registry(host: str) -> str:
    match = _HOST.fullmatch(host)
    if match is None:
        raise ImageReferenceError(f"invalid registry host {host[:64]!r}")
    port = match.group("port")
    if port is not None:
        if match.group("host").lower() in _TRANSPORTS:
            raise ImageReferenceError(
                f"{match.group('host')!r} is a transport, not a registry host"
            )
        if not 1 <= int(port) <= 65535:
            raise ImageReferenceError(f"invalid registry port {port}")
    return host
