"""The exit code of `treadle invoke` / `logs -f` for each way an execution ends."""

from __future__ import annotations

from typing import Any

import pytest

from treadle.cli.output import exit_code_for, write_output


@pytest.mark.parametrize(
    ("execution", "code"),
    [
        ({"state": "success", "exit_code": 0}, 0),
        ({"state": "failure", "exit_code": 3, "error": "exit_code"}, 3),
        ({"state": "failure", "exit_code": 255, "error": "exit_code"}, 255),
        ({"state": "failure", "exit_code": None, "error": "spawn_failed"}, 1),
        ({"state": "failure", "exit_code": None, "error": "node_lost"}, 1),
        ({"state": "failure", "error": "unschedulable"}, 1),
        ({"state": "failure", "exit_code": 0, "error": "exit_code"}, 1),
        ({"state": "failure", "exit_code": 256}, 1),
        ({"state": "failure", "exit_code": -9, "error": "killed:SIGKILL"}, 137),
        ({"state": "failure", "exit_code": None, "error": "killed:SIGSEGV"}, 139),
        ({"state": "failure", "exit_code": None, "error": "killed:SIGNOPE"}, 1),
        ({"state": "timeout", "exit_code": None, "error": "timeout"}, 124),
        ({"state": "cancelled", "exit_code": None, "error": "cancelled"}, 130),
    ],
)
def test_exit_code(execution: dict[str, Any], code: int) -> None:
    assert exit_code_for(execution) == code


@pytest.mark.parametrize("state", ["open", "running", None])
def test_unfinished_execution_has_no_exit_code(state: str | None) -> None:
    with pytest.raises(ValueError, match="not finished"):
        exit_code_for({"state": state})


def test_output_goes_to_its_own_stream() -> None:
    written: list[tuple[str, str]] = []
    write_output(
        {"stdout": "13\n", "stderr": "warn\n", "complete": True},
        lambda stream, data: written.append((stream, data)),
    )
    assert written == [("stdout", "13\n"), ("stderr", "warn\n")]
