"""Join tokens: the operator's stays reusable; one Weaver issues for a machine it starts is
accepted once, and only until it expires."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from treadle.weaver.core import Weaver
from treadle.weaver.settings import WeaverSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def weaver(tmp_path: Path) -> AsyncIterator[Weaver]:
    w = Weaver(WeaverSettings(home=tmp_path))
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


async def test_an_issued_token_is_accepted_once(weaver: Weaver) -> None:
    token = await weaver.auth.issue_join_token(ttl_s=60)
    assert await weaver.auth.join_token_valid(token) is True
    assert await weaver.auth.join_token_valid(token) is False


async def test_an_issued_token_expires(weaver: Weaver) -> None:
    token = await weaver.auth.issue_join_token(ttl_s=-1)
    assert await weaver.auth.join_token_valid(token) is False


async def test_the_operators_token_is_reusable(weaver: Weaver, tmp_path: Path) -> None:
    token = (tmp_path / "join.token").read_text().strip()
    assert await weaver.auth.join_token_valid(token) is True
    assert await weaver.auth.join_token_valid(token) is True
    assert await weaver.auth.join_token_valid("tj_unknown") is False
