"""Sandbox templates: what an E2B `templateID` names (DESIGN §11). A template is an image and
the defaults its processes start with; treadle's sandbox spec carries the image and the
environment, and the envd half of the E2B surface applies the user, working directory and
shell to the commands it starts.

Only built-in templates exist for now. `base` looks like E2B's own from inside: commands run
as `user` in `/home/user` through a login bash, and `user` has `sudo` without a password.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from treadle.domain.desktop import DesktopSpec
from treadle.domain.errors import InvalidRequest

__all__ = ["BUILTIN", "Template", "resolve"]


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    # A registry reference; None: the host's programs, read-only (treadle's own default).
    image: str | None
    user: str
    workdir: str
    # What a command line is run with: the line is appended as the last argument.
    shell: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Its user may become root with `sudo`, without a password.
    sudo: bool = False
    # A display of this size, with ctrl and stream (None: no desktop).
    desktop: DesktopSpec | None = None

    def command(self, line: str) -> list[str]:
        return [*self.shell, line]


_BASE = Template(
    name="base",
    image=None,
    user="user",
    workdir="/home/user",
    shell=("/bin/bash", "-l", "-c"),
    sudo=True,
)
BUILTIN: Mapping[str, Template] = MappingProxyType(
    {
        "base": _BASE,
        # `base` with a desktop: an X display of 1280x800, a window manager, ctrl and stream.
        "desktop": replace(_BASE, name="desktop", desktop=DesktopSpec()),
    }
)


def resolve(name: str) -> Template:
    """The template called `name`; InvalidRequest naming it and the known ones otherwise."""
    template = BUILTIN.get(name)
    if template is None:
        known = ", ".join(sorted(BUILTIN))
        raise InvalidRequest(
            f"template {name!r} not found; the templates here are: {known}",
            details=[{"loc": ["body", "templateID"], "msg": "unknown template"}],
        )
    return template
