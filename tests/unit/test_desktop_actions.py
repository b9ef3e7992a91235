"""What a desktop sandbox's ctrl is asked to do (`treadle.domain.desktop`): both vocabularies
become the same steps, keys are X keysym names, and what is not valid is refused naming the
field, before anything reaches the sandbox."""

from __future__ import annotations

from typing import Any

import pytest

from treadle.domain.desktop import ActionsRequest, Screenshot, canonical, key_name
from treadle.domain.errors import InvalidRequest

W, H = 1280, 800


def steps(*actions: dict[str, Any], screenshot: Any = None) -> tuple[list[dict[str, Any]], Any]:
    return canonical(ActionsRequest(actions=list(actions), screenshot=screenshot), W, H)


def refused(*actions: dict[str, Any], screenshot: Any = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        steps(*actions, screenshot=screenshot)
    return caught.value


def test_a_tool_call_and_the_native_action_are_the_same_steps() -> None:
    pairs = [
        ({"action": "left_click", "coordinate": [10, 20]}, {"type": "click", "x": 10, "y": 20}),
        (
            {"action": "double_click", "coordinate": [1, 2]},
            {"type": "click", "x": 1, "y": 2, "count": 2},
        ),
        ({"action": "right_click"}, {"type": "click", "button": "right"}),
        ({"action": "mouse_move", "coordinate": [5, 6]}, {"type": "move", "x": 5, "y": 6}),
        ({"action": "type", "text": "héllo ✓\n"}, {"type": "type", "text": "héllo ✓\n"}),
        ({"action": "key", "text": "ctrl+shift+t"}, {"type": "key", "keys": "ctrl+shift+t"}),
        ({"action": "cursor_position"}, {"type": "cursor"}),
        (
            {"action": "left_click_drag", "start_coordinate": [1, 1], "coordinate": [9, 9]},
            {"type": "drag", "path": [[1, 1], [9, 9]]},
        ),
        (
            {
                "action": "scroll",
                "coordinate": [3, 4],
                "scroll_direction": "up",
                "scroll_amount": 2,
            },
            {"type": "scroll", "x": 3, "y": 4, "dy": -2},
        ),
        ({"action": "wait", "duration": 0.25}, {"type": "wait", "ms": 250}),
    ]
    for tool, native in pairs:
        assert steps(tool) == steps(native), tool


def test_keys_are_x_keysym_names_whatever_they_are_called() -> None:
    assert [key_name(k) for k in ("ctrl", "CTRL", "Return", "enter", "esc", "a", "Z", "7")] == [
        "Control_L",
        "Control_L",
        "Return",
        "Return",
        "Escape",
        "a",
        "Z",
        "7",
    ]
    assert [key_name(k) for k in ("/", "+", "pageup", "F12", "kp_enter", "super")] == [
        "slash",
        "plus",
        "Prior",
        "F12",
        "KP_Enter",
        "Super_L",
    ]
    (chord,) = steps({"type": "key", "keys": "ctrl++"})[0]
    assert chord["keys"] == ["Control_L", "plus"]
    # xdotool's syntax: chords separated by spaces, in order
    sequence, _ = steps({"action": "key", "text": "ctrl+a Delete"})
    assert [s["keys"] for s in sequence] == [["Control_L", "a"], ["Delete"]]


def test_a_click_with_keys_held_holds_them_around_it() -> None:
    held, _ = steps({"action": "left_click", "coordinate": [1, 1], "text": "shift"})
    assert [s["type"] for s in held] == ["key_down", "click", "key_up"]
    assert held[0]["key"] == held[2]["key"] == "Shift_L"
    hold, _ = steps({"action": "hold_key", "text": "alt+tab", "duration": 0.5})
    assert [(s["type"], s.get("key", s.get("ms"))) for s in hold] == [
        ("key_down", "Alt_L"),
        ("key_down", "Tab"),
        ("wait", 500),
        ("key_up", "Tab"),
        ("key_up", "Alt_L"),
    ]


def test_a_screenshot_is_asked_by_the_body_or_by_a_tool_call() -> None:
    assert steps(screenshot=True) == ([], Screenshot())
    _, shot = steps({"action": "screenshot"})
    assert shot == Screenshot()
    _, zoomed = steps({"action": "zoom", "region": [100, 50, 300, 150]})
    assert zoomed.region == (100, 50, 200, 100)
    _, jpeg = steps(screenshot={"format": "jpeg", "quality": 50, "region": [0, 0, 10, 10]})
    assert (jpeg.format, jpeg.quality, jpeg.region) == ("jpeg", 50, (0, 0, 10, 10))


@pytest.mark.parametrize(
    ("action", "loc", "words"),
    [
        ({"type": "click", "x": 1280, "y": 0}, ["x"], "off the 1280x800 screen"),
        ({"type": "move", "x": 0, "y": 800}, ["x"], "off the"),
        ({"type": "move", "x": -1, "y": 0}, ["x"], "greater than or equal to 0"),
        ({"type": "drag", "path": [[0, 0], [5000, 0]]}, ["path", 1, 0], "less than"),
        ({"type": "drag", "path": [[0, 0], [1279, 800]]}, ["path[1]"], "off the"),
        ({"type": "key", "keys": "ctrl+nosuchkey"}, [], "unknown key 'nosuchkey'"),
        ({"type": "key", "keys": "é"}, [], "type text with a `type` action"),
        ({"type": "click", "button": "fourth"}, ["button"], "'left', 'middle'"),
        ({"type": "click", "x": 5}, [], "give both x and y"),
        ({"type": "wait", "ms": 60_001}, ["ms"], "less than or equal to 60000"),
        ({"type": "teleport"}, [], "does not match any of the expected tags"),
        ({"action": "fly"}, ["action"], "Input should be"),
        ({"action": "mouse_move"}, [], "needs `coordinate`"),
        ({"action": "left_click", "coordinate": [1, 2, 3]}, ["coordinate"], "at most 2 items"),
        ({"type": "type", "text": "x" * 10_001}, ["text"], "at most 10000"),
        ({"type": "scroll", "dy": 1e309}, ["dy"], "finite"),
    ],
)
def test_what_is_not_valid_is_refused_naming_the_field(
    action: dict[str, Any], loc: list[Any], words: str
) -> None:
    error = refused({"type": "move", "x": 1, "y": 1}, action)
    assert error.details[0]["loc"] == ["body", "actions", 1, *loc]
    assert words in str(error), str(error)


def test_a_batch_is_bounded() -> None:
    with pytest.raises(ValueError, match="at most 100 items"):
        ActionsRequest(actions=[{"type": "cursor"}] * 101)
    error = refused({"type": "wait", "ms": 40_000}, {"type": "wait", "ms": 30_000})
    assert "add up to at most 60000 ms" in str(error)
    error = refused(screenshot={"region": [1200, 0, 100, 10]})
    assert error.details[0]["loc"] == ["body", "screenshot", "region"]


def test_a_desktop_runs_in_a_tier_with_a_network_of_its_own() -> None:
    from treadle.domain.resources import Tier
    from treadle.domain.sandbox import SandboxSpec

    assert SandboxSpec(desktop={}).tier_floor is Tier.NAMESPACE
    assert SandboxSpec(desktop={}, min_isolation="gvisor").tier_floor is Tier.GVISOR
    assert SandboxSpec().tier_floor is None
    with pytest.raises(ValueError, match="a desktop needs a tier"):
        SandboxSpec(desktop={}, isolation="process")


def test_what_an_action_expands_to_is_bounded_too() -> None:
    chords = " ".join(["a"] * 600)
    error = refused({"action": "key", "text": chords}, {"action": "key", "text": chords})
    assert "at most 1000 steps" in str(error)
    assert error.details[0]["loc"] == ["body", "actions", 1]
    # A scroll at a point names both coordinates, as a click does.
    error = refused({"type": "scroll", "x": 5, "dy": 1})
    assert "give both x and y" in str(error)
