"""The limits shared by Weaver and Shuttle (treadle.protocol.limits, treadle.domain.images):
exactly at each limit is accepted, one past it is refused, the same way on both sides."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from treadle.domain.errors import ProtocolError
from treadle.domain.function import FunctionSpec, ensure_json_safe
from treadle.domain.images import (
    MAX_NAME_LENGTH,
    MAX_TAG_LENGTH,
    ImageReferenceError,
    parse_image,
)
from treadle.domain.resources import Resources, Tier
from treadle.protocol.limits import (
    INVALID_REPORT,
    MAX_JSON_DEPTH,
    RESULT_INVALID,
    OutputBudget,
    check_json,
    json_depth_within,
    output_marker,
)
from treadle.protocol.messages import (
    AssignSpec,
    Chunk,
    Exited,
    Output,
    ShuttleMessage,
    Usage,
    decode_from_shuttle,
    examine_refused,
)
from treadle.shuttle.oci.images import ImageError, parse_reference
from treadle.shuttle.runtimes.process import ProcessRuntime
from treadle.shuttle.supervisor import Supervisor
from treadle.weaver.services.executions import InvokeRequest

PY = "/usr/bin/python3"


def nested(depth: int) -> Any:
    """A JSON value `depth` levels deep: lists, with an object at the top."""
    value: Any = 0
    for _ in range(depth - 1):
        value = [value]
    return {"x": value} if depth else value


def text(depth: int) -> str:
    return "[" * depth + "]" * depth


# JSON depth


def test_depth_counts_arrays_and_objects() -> None:
    assert json_depth_within(5, 0)
    assert not json_depth_within({}, 0)
    assert json_depth_within({"a": [1, {"b": None}]}, 3)
    assert not json_depth_within({"a": [1, {"b": []}]}, 3)


def test_json_at_the_depth_limit_is_accepted_and_one_past_refused() -> None:
    assert check_json(nested(MAX_JSON_DEPTH)) == nested(MAX_JSON_DEPTH)
    with pytest.raises(ValueError, match=f"deeper than {MAX_JSON_DEPTH}"):
        check_json(nested(MAX_JSON_DEPTH + 1))


def test_far_too_deep_json_is_refused_without_recursing() -> None:
    with pytest.raises(ValueError, match="deeper"):
        check_json(nested(200_000))


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        [float("inf")],
        {"k": (1, -float("inf"))},
        {"k": "\ud800"},
        {"\udfff": 1},
        {float("nan"): 1},
    ],
)
def test_json_must_be_representable(value: Any) -> None:
    with pytest.raises(ValueError, match="not representable"):
        check_json(value)


def test_invoke_args_at_the_limit_are_accepted_and_one_past_refused() -> None:
    assert InvokeRequest.model_validate({"args": nested(MAX_JSON_DEPTH)}).args
    with pytest.raises(ValidationError, match=f"deeper than {MAX_JSON_DEPTH}") as refused:
        InvokeRequest.model_validate({"args": nested(MAX_JSON_DEPTH + 1)})
    assert refused.value.errors()[0]["loc"] == ("args",)


def test_assignment_args_are_held_to_the_same_limit() -> None:
    spec: dict[str, Any] = {
        "id": "ex_1",
        "attempt": 1,
        "tenant_id": "tn_1",
        "function": "f",
        "version": 1,
        "argv": ["true"],
        "timeout_s": 1,
        "resources": Resources(),
        "isolation": Tier.PROCESS,
    }
    assert AssignSpec(**spec, args=nested(MAX_JSON_DEPTH)).args
    with pytest.raises(ValidationError):
        AssignSpec(**spec, args=nested(MAX_JSON_DEPTH + 1))


# Frames from a node


def exited_frame(**fields: Any) -> dict[str, Any]:
    return {
        "type": "exited",
        "id": "ex_1",
        "attempt": 1,
        "exit_code": 0,
        "reason": None,
        "result": None,
        "chunks": 0,
        "usage": {"wall_ms": 1.0},
        **fields,
    }


def output_frame(seq: int = 0, data: str = "x") -> dict[str, Any]:
    chunk = {"stream": "stdout", "seq": seq, "data": data}
    return {"type": "output", "id": "ex_1", "attempt": 1, "chunks": [chunk]}


def decode(frame: dict[str, Any]) -> ShuttleMessage:
    return decode_from_shuttle(json.dumps(frame))


def test_exit_report_at_the_depth_limit_is_accepted_and_one_past_refused() -> None:
    at_limit = decode(exited_frame(result=nested(MAX_JSON_DEPTH)))
    assert isinstance(at_limit, Exited) and at_limit.result == nested(MAX_JSON_DEPTH)
    with pytest.raises(ProtocolError):
        decode(exited_frame(result=nested(MAX_JSON_DEPTH + 1)))


@pytest.mark.parametrize(
    "frame",
    [
        exited_frame(exit_code=2**31),
        exited_frame(exit_code=-(2**31) - 1),
        exited_frame(exit_code=2**70),
        exited_frame(attempt=2**31),
        exited_frame(chunks=2**31),
        exited_frame(usage={"wall_ms": float("nan")}),
        exited_frame(usage={"wall_ms": float("inf")}),
        exited_frame(usage={"wall_ms": 1, "max_rss_kib": 2**63}),
        exited_frame(result=float("nan")),
        output_frame(seq=2**31),
        output_frame(data=""),
        {"type": "heartbeat", "load": float("nan")},
        {"type": "started", "id": "ex_1", "attempt": 2**70},
    ],
)
def test_numbers_outside_their_columns_and_non_finite_ones_are_refused(
    frame: dict[str, Any],
) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def test_numbers_at_their_limits_are_accepted() -> None:
    frame = exited_frame(
        attempt=2**31 - 1,
        exit_code=-(2**31),
        chunks=2**31 - 1,
        usage={"wall_ms": 1e300, "max_rss_kib": 2**63 - 1},
    )
    assert isinstance(decode(frame), Exited)
    assert isinstance(decode(exited_frame(exit_code=2**31 - 1)), Exited)
    assert isinstance(decode(output_frame(seq=2**31 - 1)), Output)


def test_a_report_outside_the_limits_drops_its_result_and_fails() -> None:
    fields: dict[str, Any] = {
        "id": "ex_1",
        "attempt": 1,
        "exit_code": 0,
        "chunks": 0,
        "usage": Usage(),
    }
    kept = Exited.report(reason=None, result=nested(MAX_JSON_DEPTH), **fields)
    assert (kept.reason, kept.result) == (None, nested(MAX_JSON_DEPTH))
    dropped = Exited.report(reason=None, result=nested(MAX_JSON_DEPTH + 1), **fields)
    assert (dropped.reason, dropped.result) == (RESULT_INVALID, None)
    assert dropped.exit_code == 0
    timed_out = Exited.report(reason="timeout", result=float("inf"), **fields)
    assert (timed_out.reason, timed_out.result) == ("timeout", None)


def test_a_refused_exit_report_keeps_what_it_says_but_its_result() -> None:
    raw = json.dumps(exited_frame(exit_code=3, result=nested(MAX_JSON_DEPTH + 1)))
    seen = examine_refused(raw)
    assert (seen.type, seen.id, seen.attempt) == ("exited", "ex_1", 1)
    assert seen.exited is not None
    assert (seen.exited.exit_code, seen.exited.reason, seen.exited.result) == (
        3,
        RESULT_INVALID,
        None,
    )
    # What Weaver salvages is what the node itself would have sent.
    assert seen.exited == Exited.report(
        id="ex_1",
        attempt=1,
        exit_code=3,
        reason=None,
        result=nested(MAX_JSON_DEPTH + 1),
        chunks=0,
        usage=Usage(wall_ms=1.0),
    )


def test_a_refused_frame_names_its_attempt_when_it_can() -> None:
    bad_exit = examine_refused(json.dumps(exited_frame(exit_code=2**70)))
    assert (bad_exit.type, bad_exit.id, bad_exit.attempt, bad_exit.exited) == (
        "exited",
        "ex_1",
        1,
        None,
    )
    assert examine_refused(json.dumps(exited_frame(attempt=2**70))).id is None
    for raw in ("{not json", "[]", text(100_000), '{"type": "exited", "id": 5, "attempt": 1}'):
        assert examine_refused(raw).id is None
    assert INVALID_REPORT != RESULT_INVALID


# Output cap


def test_output_up_to_the_cap_passes_whole_and_past_it_is_cut_with_a_marker() -> None:
    exact = OutputBudget(10)
    assert exact.take("12345") == "12345"
    assert exact.take("67890") == "67890"
    assert not exact.truncated
    assert exact.take("x") == "\n" + output_marker(10)
    assert exact.truncated
    assert exact.take("more") is None

    over = OutputBudget(10)
    assert over.take("123456789\nabc") == "123456789\n" + output_marker(10)
    assert over.used == 10


def test_a_character_cut_by_the_cap_is_left_out_whole() -> None:
    budget = OutputBudget(4)
    assert budget.take("abcé") == "abc\n" + output_marker(4)  # é is 2 bytes: 5 in all
    assert budget.used == 3


def test_output_a_node_cut_is_what_weaver_makes_of_it() -> None:
    pieces = ["a" * 700, "b" * 700, "c\n" * 300]
    node = OutputBudget(1000)
    sent = [kept for piece in pieces if (kept := node.take(piece)) is not None]
    weaver = OutputBudget(1000)
    stored = [kept for piece in sent if (kept := weaver.take(piece)) is not None]
    uncut = OutputBudget(1000)
    direct = [kept for piece in pieces if (kept := uncut.take(piece)) is not None]
    assert stored == sent == direct
    assert "".join(stored).endswith(output_marker(1000))
    assert (weaver.used, weaver.truncated) == (1000, True)


def test_no_cap_passes_everything() -> None:
    budget = OutputBudget(None)
    assert budget.take("x" * 100_000) == "x" * 100_000
    assert not budget.truncated


# Image references


@pytest.mark.parametrize(
    "reference",
    [
        "busybox",
        "busybox:1.36",
        "docker:24-dind",
        "library/busybox@sha256:" + "a" * 64,
        "localhost/x",
        "localhost:5000/a/b_c__d.e--f:v2",
        "127.0.0.1:65535/x",
        "registry.example.com/team/app:Tag_1.0-rc",
        "a" * MAX_NAME_LENGTH,
        "host.io/" + "a" * (MAX_NAME_LENGTH - len("host.io/")),
        "x:" + "t" * MAX_TAG_LENGTH,
    ],
)
def test_registry_references_are_accepted_by_both_sides(reference: str) -> None:
    name = parse_image(reference)
    FunctionSpec(name="f", command=["true"], image=reference)
    parsed = parse_reference(reference)
    assert (parsed.registry, parsed.tag, parsed.digest) == (name.registry, name.tag, name.digest)


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "oci:1234/x",
        "oci:/srv/layout:v1",
        "oci:layout/x",
        "dir:/srv/rootfs",
        "docker://busybox",
        "docker-archive:1/x",
        "/srv/layout",
        "./layout",
        "../layout",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        "Busy/Box",
        "a b",
        "127.0.0.1:0/x",
        "127.0.0.1:65536/x",
        "x@sha256:12",
        "x:.tag",
        "a" * (MAX_NAME_LENGTH + 1),
        "host.io/" + "a" * (MAX_NAME_LENGTH + 1 - len("host.io/")),
        "x:" + "t" * (MAX_TAG_LENGTH + 1),
    ],
)
def test_anything_else_is_refused_by_both_sides(reference: str) -> None:
    with pytest.raises(ImageReferenceError):
        parse_image(reference)
    with pytest.raises(ValidationError, match="registry reference"):
        FunctionSpec(name="f", command=["true"], image=reference)
    with pytest.raises(ImageError):
        parse_reference(reference)


def test_a_stored_function_keeps_loading_whatever_its_image() -> None:
    stored = {"name": "f", "command": ["true"], "image": "docker://busybox"}
    spec = FunctionSpec.model_validate(stored, context={"stored": True})
    assert spec.image == "docker://busybox"


# Shuttle: what leaves for Weaver stays within the limits


async def supervise(tmp_path: Path, argv: list[str], **spec: Any) -> list[ShuttleMessage]:
    """Run `argv` under a Supervisor (process tier) with no acks, and return every frame it
    sent until the exit report."""
    frames: list[ShuttleMessage] = []
    exited = asyncio.Event()

    def send(raw: str) -> None:
        frame = decode_from_shuttle(raw)  # what Weaver would make of it
        frames.append(frame)
        if isinstance(frame, Exited):
            exited.set()

    supervisor = Supervisor({Tier.PROCESS: ProcessRuntime()}, tmp_path, max_unacked=64 * 1024)
    supervisor.attach(send)
    supervisor.assign(
        AssignSpec(
            id="ex_1",
            attempt=1,
            tenant_id="tn_1",
            function="f",
            version=1,
            argv=argv,
            timeout_s=60,
            resources=Resources(),
            isolation=Tier.PROCESS,
            **spec,
        )
    )
    try:
        await asyncio.wait_for(exited.wait(), 60)
    finally:
        await supervisor.shutdown()
    return frames


def exit_of(frames: list[ShuttleMessage]) -> Exited:
    last = frames[-1]
    assert isinstance(last, Exited)
    return last


def write_result(depth: int) -> list[str]:
    return [PY, "-c", f"import os; os.write(3, b'{text(depth)}' + b'\\n')"]


async def test_a_result_at_the_depth_limit_is_reported(tmp_path: Path) -> None:
    report = exit_of(await supervise(tmp_path, write_result(MAX_JSON_DEPTH)))
    assert (report.exit_code, report.reason) == (0, None)
    assert json_depth_within(report.result, MAX_JSON_DEPTH)
    assert not json_depth_within(report.result, MAX_JSON_DEPTH - 1)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500])
async def test_a_result_past_the_depth_limit_is_reported_as_invalid(
    tmp_path: Path, depth: int
) -> None:
    report = exit_of(await supervise(tmp_path, write_result(depth)))
    assert (report.exit_code, report.reason, report.result) == (0, RESULT_INVALID, None)


async def test_output_past_the_cap_is_cut_and_the_program_is_not_blocked(
    tmp_path: Path,
) -> None:
    # Far more than the unacknowledged window and the pipe buffers hold: unless the node reads
    # on and drops what is past the cap, the program blocks (nothing is acked here).
    program = "import sys\nfor _ in range(64): sys.stdout.write('x' * 65536)\nprint('end')"
    frames = await supervise(tmp_path, [PY, "-c", program], max_output_bytes=1000)
    chunks = [chunk for frame in frames if isinstance(frame, Output) for chunk in frame.chunks]
    assert "".join(chunk.data for chunk in chunks) == "x" * 1000 + "\n" + output_marker(1000)
    report = exit_of(frames)
    assert (report.exit_code, report.reason, report.chunks) == (0, None, len(chunks))


async def test_output_within_the_cap_is_whole(tmp_path: Path) -> None:
    frames = await supervise(tmp_path, [PY, "-c", "print('x' * 999, end='')"], max_output_bytes=999)
    chunks = [chunk for frame in frames if isinstance(frame, Output) for chunk in frame.chunks]
    assert chunks and all(isinstance(chunk, Chunk) for chunk in chunks)
    assert "".join(chunk.data for chunk in chunks) == "x" * 999


def test_a_value_that_contains_itself_is_refused_not_walked_for_ever() -> None:
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="deeper"):
        ensure_json_safe(looped)
