"""A Weaver in the test's own process, started and stopped around a test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from treadle.weaver.core import Weaver
from treadle.weaver.settings import WeaverSettings

__all__ = ["running_weaver"]


@contextlib.asynccontextmanager
async def running_weaver(home: Path, database_url: str, **settings: Any) -> AsyncIterator[Weaver]:
    weaver = Weaver(WeaverSettings(home=home, database_url=database_url, **settings))
    await weaver.start()
    try:
        yield weaver
    finally:
        await weaver.stop()
