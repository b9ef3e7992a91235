"""Bounds on what one party accepts from another, shared by Weaver and Shuttle so that both
sides apply the same numbers: what the API takes from a tenant, what Weaver takes from a
node, and what a node reports about a program.

- **JSON depth.** A free-form JSON value (invoke `args`, an execution's `result`) nests
  arrays and objects at most `MAX_JSON_DEPTH` levels: `{}` and `[1]` are 1 level, `{"a": []}`
  is 2. Deeper values are refused where they enter, because every party that parses,
  validates or encodes them later does so recursively and would fail there instead.
- **Numbers.** JSON values hold finite numbers only; integers in frames fit the signed 32-bit
  or 64-bit column that stores them.
- **Output.** Past a per-execution cap of UTF-8 bytes (stdout and stderr together), output is
  cut at the cap and ends with `output_marker(cap)`; the rest is read and thrown away.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

from treadle.domain.function import ensure_json_safe

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "INT64_MAX",
    "INVALID_REPORT",
    "MAX_FRAME_BYTES",
    "MAX_JSON_DEPTH",
    "RESULT_INVALID",
    "JsonObject",
    "JsonValue",
    "OutputBudget",
    "check_json",
    "json_depth_within",
    "output_marker",
]

MAX_JSON_DEPTH = 64
# The largest frame a node takes from Weaver: an Assign carries the function's source (up to
# 1 MiB) and args, JSON-escaped. Weaver refuses to make a larger one from a tenant's request
# (a node would drop the link, and every stream of every tenant on it, rather than read it).
MAX_FRAME_BYTES = 16 * 1024 * 1024
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# The error of an attempt whose program ended but whose result breaks these limits: the
# result is dropped and the attempt fails (unless it already failed for a reason of its own).
RESULT_INVALID = "result_invalid"
# The error of an execution whose node sent a report about it that is outside the protocol.
INVALID_REPORT = "invalid_report"


def json_depth_within(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` (parsed JSON) nests at most `limit` levels. Iterative, and it stops at
    the first container past the limit: the value may be far too deep to recurse into."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def check_json(value: Any) -> Any:
    """`value` unchanged, or ValueError when it is nested past MAX_JSON_DEPTH or holds what
    standard JSON cannot carry (NaN, infinities, unpaired surrogates)."""
    ensure_json_safe(value, MAX_JSON_DEPTH)
    return value


# Free-form JSON in a pydantic model: validated against the limits above.
JsonValue = Annotated[Any, AfterValidator(check_json)]
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json)]


def output_marker(cap: int) -> str:
    return f"[treadle: output truncated after {cap} bytes]\n"


class OutputBudget:
    """What may still pass of one attempt's output under a cap of `cap` bytes (None: no cap).
    Shuttle and Weaver both run output through one, so a node that already cut its output
    produces exactly what Weaver would have made of it uncut."""

    __slots__ = ("cap", "truncated", "used")

    def __init__(self, cap: int | None, used: int = 0, truncated: bool = False) -> None:
        self.cap = cap
        self.used = used
        self.truncated = truncated

    def take(self, text: str) -> str | None:
        """What passes of `text`: all of it, its head up to the cap followed by the marker
        (the text that reaches the cap), or None once the cap was reached."""
        if self.truncated:
            return None
        size = len(text.encode("utf-8", "surrogatepass"))
        if self.cap is None or self.used + size <= self.cap:
            self.used += size
            return text
        room = max(0, self.cap - self.used)  # the cap may have been lowered meanwhile
        # A character cut in half by the cap is left out whole.
        head = text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
        self.used += len(head.encode("utf-8", "surrogatepass"))
        self.truncated = True
        # On a line of its own; the budget cannot know how the output before `text` ended.
        separator = "" if head.endswith("\n") else "\n"
        return head + separator + output_marker(self.cap)
