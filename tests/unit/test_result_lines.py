"""The result on fd 3: the newest of the last lines that parses, parsed once, at the end."""

from __future__ import annotations

import json
from typing import Any

import pytest

from treadle.shuttle.runtimes import process
from treadle.shuttle.runtimes.process import ResultLines

LIMIT = 1024


def test_the_newest_line_that_parses_wins() -> None:
    lines = ResultLines(LIMIT)
    for chunk in (b'{"a": 1}\n[2, "tw', b'o"]\nnot json\n\n{"torn": '):
        lines.feed(chunk)

    assert lines.value() == [2, "two"]


def test_lines_are_parsed_once_the_program_has_ended_not_as_they_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []
    real = json.loads

    def counting(text: Any, **options: Any) -> Any:
        parsed.append(text)
        return real(text, **options)

    monkeypatch.setattr(process.json, "loads", counting)
    lines = ResultLines(LIMIT)
    big = json.dumps([[]] * 200).encode() + b"\n"  # 800 bytes, valid
    for _ in range(1000):
        lines.feed(big)

    assert parsed == []
    assert lines.value() == [[]] * 200
    assert len(parsed) == 1


def test_only_the_last_limit_bytes_of_lines_count() -> None:
    lines = ResultLines(LIMIT)
    lines.feed(b'{"result": 1}\n')
    lines.feed(b"x" * 600 + b"\n")
    assert lines.value() == {"result": 1}  # within the limit: still found

    lines.feed(b"y" * 600 + b"\n")
    assert lines.value() is None  # pushed out by newer lines: garbage after the result


def test_a_line_past_the_limit_is_skipped_whole() -> None:
    lines = ResultLines(LIMIT)
    lines.feed(b"[1]\n")
    lines.feed(b"[" + b"0," * LIMIT)
    lines.feed(b"0]\n")

    assert lines.value() == [1]
