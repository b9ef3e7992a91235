"""Desktop sandboxes (DESIGN §12): the display a sandbox is made with, and the actions its
ctrl sidecar takes, as the API accepts them and as ctrl is sent them.

Two vocabularies are accepted, each action on its own: treadle's (`{"type": "click", ...}`)
and that of the common computer-use tool schemas (`{"action": "left_click", "coordinate":
[x, y]}`, as Anthropic's `computer` tool calls it), so that an agent's tool call can be
forwarded unchanged. Both become one canonical list (`Step`s, plain dicts) that ctrl runs
in order. Every rule about what a valid action is lives here: key names, buttons, bounds.

Coordinates are screen pixels, (0, 0) at the top left; a point off the screen is refused,
naming the field, not clamped.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from treadle.domain.errors import InvalidRequest

__all__ = [
    "CTRL_PORT",
    "DESKTOP_PORTS",
    "MAX_ACTIONS",
    "VNC_PORT",
    "ActionsRequest",
    "DesktopSpec",
    "Screenshot",
    "canonical",
    "key_name",
]

# Where the sidecars listen on the sandbox's own loopback (Weaver reaches them through the
# node's link, as it does any port).
CTRL_PORT = 49990
VNC_PORT = 5900
# Never reached as plain ports (`/ports/…`, whatever opens them there, public ports
# included): the desktop's routes are the only way in, with their own access and filter.
DESKTOP_PORTS = frozenset({CTRL_PORT, VNC_PORT})
# One batch: how many actions, how long its waits may add up to, and the longest text.
MAX_ACTIONS = 100
# ... and the steps they come to (a tool call's "a b c …" is a chord each).
MAX_STEPS = 1000
MAX_WAIT_MS = 60_000
MAX_TEXT = 10_000
MAX_PATH_POINTS = 1_000
MAX_SIDE = 4096

Button = Literal["left", "middle", "right"]
Coordinate = Annotated[int, Field(ge=0, le=MAX_SIDE)]
Point = tuple[Coordinate, Coordinate]


class DesktopSpec(BaseModel):
    """A sandbox's display: `desktop` in the create body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(default=1280, ge=64, le=MAX_SIDE)
    height: int = Field(default=800, ge=64, le=MAX_SIDE)
    depth: Literal[16, 24] = 24


class Screenshot(BaseModel):
    """What image an answer carries."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal["png", "jpeg"] = "png"
    quality: int = Field(default=80, ge=1, le=100)
    # [x, y, width, height]; None: the whole screen
    region: tuple[Coordinate, Coordinate, Coordinate, Coordinate] | None = None
    scale: float | None = Field(default=None, gt=0, le=1)
    cursor: bool = False
    # Only the box that changed since this session's last full capture (WebSocket sessions).
    changed_only: bool = False


# treadle's vocabulary


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Move(_Action):
    type: Literal["move"]
    x: Coordinate
    y: Coordinate


class _At(_Action):
    """An action at a point, or where the pointer is."""

    x: Coordinate | None = None
    y: Coordinate | None = None

    @model_validator(mode="after")
    def _both(self) -> Self:
        if (self.x is None) != (self.y is None):
            raise ValueError("give both x and y, or neither (where the pointer is)")
        return self


class Click(_At):
    type: Literal["click"]
    button: Button = "left"
    count: int = Field(default=1, ge=1, le=3)
    # keys held while clicking (shift-click)
    hold: list[str] = Field(default_factory=list, max_length=8)


class Press(_Action):
    type: Literal["press", "release"]
    button: Button = "left"


class Drag(_Action):
    type: Literal["drag"]
    path: list[Point] = Field(min_length=2, max_length=MAX_PATH_POINTS)
    button: Button = "left"


class Scroll(_At):
    type: Literal["scroll"]
    # clicks of the wheel: dy > 0 down, dx > 0 right
    dx: int = Field(default=0, ge=-100, le=100)
    dy: int = Field(default=0, ge=-100, le=100)


class Type(_Action):
    type: Literal["type"]
    text: str = Field(max_length=MAX_TEXT)


class Key(_Action):
    type: Literal["key"]
    # one chord ("ctrl+shift+t") or its keys (["ctrl", "shift", "t"])
    keys: str | list[str]
    repeat: int = Field(default=1, ge=1, le=100)


class KeyHold(_Action):
    type: Literal["key_down", "key_up"]
    key: str


class Wait(_Action):
    type: Literal["wait"]
    ms: int = Field(ge=0, le=MAX_WAIT_MS)


class Query(_Action):
    type: Literal["cursor", "size"]


Native = Annotated[
    Move | Click | Press | Drag | Scroll | Type | Key | KeyHold | Wait | Query,
    Field(discriminator="type"),
]


# the computer-use tool's vocabulary (Anthropic's `computer` tool, as it calls it)


class ToolCall(_Action):
    action: Literal[
        "screenshot",
        "zoom",
        "cursor_position",
        "mouse_move",
        "left_click",
        "right_click",
        "middle_click",
        "double_click",
        "triple_click",
        "left_click_drag",
        "left_mouse_down",
        "left_mouse_up",
        "scroll",
        "type",
        "key",
        "hold_key",
        "wait",
    ]
    coordinate: Point | None = None
    start_coordinate: Point | None = None
    text: str | None = Field(default=None, max_length=MAX_TEXT)
    scroll_direction: Literal["up", "down", "left", "right"] | None = None
    scroll_amount: int | None = Field(default=None, ge=0, le=100)
    duration: float | None = Field(default=None, ge=0, le=MAX_WAIT_MS / 1000)
    # zoom: [x0, y0, x1, y1]
    region: tuple[Coordinate, Coordinate, Coordinate, Coordinate] | None = None


class ActionsRequest(BaseModel):
    """The body of `POST /v1/sandboxes/{id}/desktop/actions`: actions run in order, then
    one screenshot if asked (`true`: a PNG of the whole screen)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    actions: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_ACTIONS)
    screenshot: Screenshot | bool | None = None


_NATIVE: TypeAdapter[Any] = TypeAdapter(Native)

# Keys: X keysym names, matched without regard to case, and the names people and tool
# schemas use for them.
_NAMED = (
    "BackSpace Tab Linefeed Clear Return Pause Scroll_Lock Sys_Req Escape Delete Home Left Up "
    "Right Down Prior Page_Up Next Page_Down End Begin Select Print Execute Insert Undo Redo "
    "Menu Find Cancel Help Break Num_Lock Caps_Lock Shift_L Shift_R Control_L Control_R "
    "Meta_L Meta_R Alt_L Alt_R Super_L Super_R Hyper_L Hyper_R ISO_Level3_Shift space "
    "KP_Space KP_Tab KP_Enter KP_Home KP_Left KP_Up KP_Right KP_Down KP_Prior KP_Next KP_End "
    "KP_Begin KP_Insert KP_Delete KP_Equal KP_Multiply KP_Add KP_Separator KP_Subtract "
    "KP_Decimal KP_Divide " + " ".join(f"KP_{n}" for n in range(10)) + " "
    "XF86AudioMute XF86AudioLowerVolume XF86AudioRaiseVolume XF86AudioPlay XF86AudioStop "
    "XF86AudioPrev XF86AudioNext XF86Back XF86Forward XF86Refresh XF86Search XF86HomePage "
    "XF86Mail XF86Calculator " + " ".join(f"F{n}" for n in range(1, 36))
).split()
_ALIASES = {
    "ctrl": "Control_L",
    "control": "Control_L",
    "shift": "Shift_L",
    "alt": "Alt_L",
    "option": "Alt_L",
    "meta": "Meta_L",
    "super": "Super_L",
    "win": "Super_L",
    "windows": "Super_L",
    "cmd": "Super_L",
    "command": "Super_L",
    "enter": "Return",
    "esc": "Escape",
    "del": "Delete",
    "ins": "Insert",
    "pageup": "Prior",
    "pgup": "Prior",
    "pagedown": "Next",
    "pgdn": "Next",
    "arrowup": "Up",
    "arrowdown": "Down",
    "arrowleft": "Left",
    "arrowright": "Right",
    "capslock": "Caps_Lock",
    "printscreen": "Print",
    "spacebar": "space",
}
# Printable ASCII that is not a letter or digit, by its keysym name.
_PUNCTUATION = dict(
    zip(
        " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        [
            "space",
            "exclam",
            "quotedbl",
            "numbersign",
            "dollar",
            "percent",
            "ampersand",
            "apostrophe",
            "parenleft",
            "parenright",
            "asterisk",
            "plus",
            "comma",
            "minus",
            "period",
            "slash",
            "colon",
            "semicolon",
            "less",
            "equal",
            "greater",
            "question",
            "at",
            "bracketleft",
            "backslash",
            "bracketright",
            "asciicircum",
            "underscore",
            "grave",
            "braceleft",
            "bar",
            "braceright",
            "asciitilde",
        ],
        strict=True,
    )
)
_BY_LOWER = {name.lower(): name for name in _NAMED} | _ALIASES
_CHARACTER_NAMES = set(_PUNCTUATION.values())


def key_name(key: object) -> str:
    """The X keysym name of `key` (a keysym name in any case, an alias such as `ctrl` or
    `enter`, or one printable ASCII character); ValueError naming it otherwise."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid key {key!r}")
    if len(key) == 1:
        if key in string.ascii_letters or key in string.digits:
            return key
        if key in _PUNCTUATION:
            return _PUNCTUATION[key]
        raise ValueError(f"unknown key {key!r}: type text with a `type` action")
    found = _BY_LOWER.get(key.lower())
    if found is None and key in _CHARACTER_NAMES:
        found = key
    if found is None:
        raise ValueError(f"unknown key {key!r}")
    return found


def chord(keys: str | Sequence[str]) -> list[str]:
    """The keysym names of a chord: "ctrl+shift+t" or ["ctrl", "shift", "t"]."""
    if isinstance(keys, str):
        if keys == "+" or keys.endswith("++"):  # "ctrl++": the plus key itself
            parts = [*keys[:-2].split("+"), "+"] if len(keys) > 1 else ["+"]
        else:
            parts = keys.split("+")
    else:
        parts = list(keys)
    if not parts or len(parts) > 8:
        raise ValueError("a chord is 1 to 8 keys")
    return [key_name(part.strip() if len(part) > 1 else part) for part in parts]


def canonical(
    request: ActionsRequest, width: int, height: int
) -> tuple[list[dict[str, Any]], Screenshot | None]:
    """The steps ctrl runs for `request` on a screen of `width` by `height`, and the screenshot to
    answer with; InvalidRequest naming the field of the first action that is not valid."""
    steps: list[dict[str, Any]] = []
    shot: Screenshot | None = None
    if request.screenshot is True:
        shot = Screenshot()
    elif isinstance(request.screenshot, Screenshot):
        shot = request.screenshot
    waited = 0
    for index, raw in enumerate(request.actions):
        loc: list[str | int] = ["body", "actions", index]
        try:
            if "action" in raw:
                added, wanted = _tool_call(ToolCall.model_validate(raw))
                if wanted is not None:
                    shot = wanted
            else:
                added = _native(_NATIVE.validate_python(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = [p for p in first["loc"] if p not in _TYPE_TAGS]
            raise InvalidRequest(
                f"action {index}: {first['msg']}",
                details=[{"loc": [*loc, *where], "msg": first["msg"]}],
            ) from None
        except ValueError as exc:
            raise InvalidRequest(
                f"action {index}: {exc}", details=[{"loc": loc, "msg": str(exc)}]
            ) from None
        for step in added:
            _check_bounds(step, width, height, loc)
            waited += step.get("ms", 0) if step["type"] == "wait" else 0
        steps += added
        if len(steps) > MAX_STEPS:
            raise InvalidRequest(
                f"the actions of one batch come to at most {MAX_STEPS} steps (chords, keys "
                "held, moves); send the rest in another",
                details=[{"loc": loc, "msg": "too many steps"}],
            )
    if waited > MAX_WAIT_MS:
        raise InvalidRequest(
            f"the waits of one batch add up to at most {MAX_WAIT_MS} ms",
            details=[{"loc": ["body", "actions"], "msg": "too long a wait"}],
        )
    if shot is not None and shot.region is not None:
        x, y, w, h = shot.region
        if w < 1 or h < 1 or x + w > width or y + h > height:
            raise InvalidRequest(
                f"the region {list(shot.region)} is not within the {width}x{height} screen",
                details=[{"loc": ["body", "screenshot", "region"], "msg": "off the screen"}],
            )
    return steps, shot


_TYPE_TAGS = {
    "move",
    "click",
    "press",
    "release",
    "drag",
    "scroll",
    "type",
    "key",
    "key_down",
    "key_up",
    "wait",
    "cursor",
    "size",
}


def _native(action: Any) -> list[dict[str, Any]]:
    if isinstance(action, Key):
        return [{"type": "key", "keys": chord(action.keys), "repeat": action.repeat}]
    if isinstance(action, KeyHold):
        return [{"type": action.type, "key": key_name(action.key)}]
    if isinstance(action, Click):
        held = [key_name(k) for k in action.hold]
        return _holding(held, [action.model_dump(exclude={"hold"}, exclude_none=True)])
    if isinstance(action, Drag):
        return [{"type": "drag", "button": action.button, "path": [list(p) for p in action.path]}]
    plain: dict[str, Any] = action.model_dump(exclude_none=True)
    return [plain]


def _tool_call(call: ToolCall) -> tuple[list[dict[str, Any]], Screenshot | None]:
    """A computer-use tool call as steps, and the screenshot it asks for (if any)."""
    name = call.action
    at = _at(call.coordinate)
    modifiers = chord(call.text) if call.text and (name in _CLICKS or name == "scroll") else []
    if name == "screenshot":
        return [], Screenshot()
    if name == "zoom":
        if call.region is None:
            raise ValueError("zoom needs `region`: [x0, y0, x1, y1]")
        x0, y0, x1, y1 = call.region
        if x1 <= x0 or y1 <= y0:
            raise ValueError("zoom's region is [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        return [], Screenshot(region=(x0, y0, x1 - x0, y1 - y0))
    if name == "cursor_position":
        return [{"type": "cursor"}], None
    if name == "mouse_move":
        return [{"type": "move", **_need(at, name)}], None
    if name in _CLICKS:
        button, count = _CLICKS[name]
        return _holding(
            modifiers, [{"type": "click", "button": button, "count": count, **at}]
        ), None
    if name == "left_click_drag":
        if call.start_coordinate is None or call.coordinate is None:
            raise ValueError("left_click_drag needs `start_coordinate` and `coordinate`")
        path = [list(call.start_coordinate), list(call.coordinate)]
        return [{"type": "drag", "button": "left", "path": path}], None
    if name in ("left_mouse_down", "left_mouse_up"):
        kind = "press" if name == "left_mouse_down" else "release"
        move = [{"type": "move", **at}] if at else []
        return [*move, {"type": kind, "button": "left"}], None
    if name == "scroll":
        amount = 3 if call.scroll_amount is None else call.scroll_amount
        direction = call.scroll_direction or "down"
        dx = {"left": -amount, "right": amount}.get(direction, 0)
        dy = {"up": -amount, "down": amount}.get(direction, 0)
        return _holding(modifiers, [{"type": "scroll", "dx": dx, "dy": dy, **at}]), None
    if name == "type":
        if call.text is None:
            raise ValueError("type needs `text`")
        return [{"type": "type", "text": call.text}], None
    if name in ("key", "hold_key"):
        if not call.text:
            raise ValueError(f"{name} needs `text`, e.g. 'ctrl+s'")
        if name == "key":
            # xdotool's syntax, which these tools follow: chords separated by spaces
            return [{"type": "key", "keys": chord(c), "repeat": 1} for c in call.text.split()], None
        keys = chord(call.text)
        ms = round((call.duration or 0) * 1000)
        return [
            *({"type": "key_down", "key": k} for k in keys),
            {"type": "wait", "ms": ms},
            *({"type": "key_up", "key": k} for k in reversed(keys)),
        ], None
    # wait
    return [{"type": "wait", "ms": round((call.duration or 0) * 1000)}], None


_CLICKS = {
    "left_click": ("left", 1),
    "right_click": ("right", 1),
    "middle_click": ("middle", 1),
    "double_click": ("left", 2),
    "triple_click": ("left", 3),
}


def _at(coordinate: Point | None) -> dict[str, int]:
    return {} if coordinate is None else {"x": coordinate[0], "y": coordinate[1]}


def _need(at: dict[str, int], name: str) -> dict[str, int]:
    if not at:
        raise ValueError(f"{name} needs `coordinate`")
    return at


def _holding(keys: list[str], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`steps` with `keys` held down around them."""
    return [
        *({"type": "key_down", "key": k} for k in keys),
        *steps,
        *({"type": "key_up", "key": k} for k in reversed(keys)),
    ]


def _check_bounds(step: Mapping[str, Any], width: int, height: int, loc: list[str | int]) -> None:
    points: list[tuple[str, Any, Any]] = []
    if "x" in step:
        points.append(("x", step["x"], step["y"]))
    for n, point in enumerate(step.get("path") or []):
        points.append((f"path[{n}]", point[0], point[1]))
    for name, x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise InvalidRequest(
                f"({x}, {y}) is off the {width}x{height} screen",
                details=[{"loc": [*loc, name], "msg": "off the screen"}],
            )
