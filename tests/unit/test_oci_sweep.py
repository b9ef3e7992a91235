"""Sweeping up after dead Shuttles asks a tool for its containers only where it kept some:
a Shuttle's trial runs leave each tool's state directory behind, empty, and asking every
tool of hundreds of such leftovers held a Shuttle's start for seconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from treadle.shuttle.oci.tools import OciTool, SweepReport, ToolKind
from treadle.shuttle.runtimes import oci

DEAD = "0123abcd.4000001"  # past any pid_max: no such process


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the sweep found and handed on, in place of running the tools."""
    seen: dict[str, Any] = {"found": 0, "swept": []}

    def find_tools(state_dir: Path, **_: Any) -> list[OciTool]:
        seen["found"] += 1
        return [OciTool(kind, f"/bin/{kind.value}", state_dir / kind.value) for kind in ToolKind]

    def sweep(tools: list[OciTool], **_: Any) -> SweepReport:
        seen["swept"].append(sorted(tool.kind.value for tool in tools))
        return SweepReport([], [], [], [])

    monkeypatch.setattr(oci, "find_tools", find_tools)
    monkeypatch.setattr(oci, "sweep", sweep)
    return seen


def _leftover(owned: Path, holding: ToolKind | None) -> Path:
    entry = owned / DEAD
    for kind in ToolKind:
        (entry / kind.value).mkdir(parents=True)
    if holding is not None:
        (entry / holding.value / "tr-container").mkdir()
    return entry


def test_empty_state_directories_ask_no_tool_and_the_leftover_goes(
    tmp_path: Path, asked: dict[str, Any]
) -> None:
    entry = _leftover(tmp_path, holding=None)
    oci._sweep_dead(tmp_path)
    assert asked == {"found": 0, "swept": [[]]}
    assert not entry.exists()


def test_the_tool_that_kept_a_container_is_asked_and_no_other(
    tmp_path: Path, asked: dict[str, Any]
) -> None:
    entry = _leftover(tmp_path, holding=ToolKind.RUNC)
    oci._sweep_dead(tmp_path)
    assert asked == {"found": 1, "swept": [["runc"]]}
    assert not entry.exists()


def test_a_live_shuttles_entry_is_left_alone(tmp_path: Path, asked: dict[str, Any]) -> None:
    entry = tmp_path / f"0123abcd.{os.getpid()}"
    (entry / ToolKind.CRUN.value / "tr-container").mkdir(parents=True)
    oci._sweep_dead(tmp_path)
    assert asked == {"found": 0, "swept": []}
    assert entry.exists()
