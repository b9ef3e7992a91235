"""The pure rules behind sandboxes' idle timeout and signed port URLs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from treadle.domain.errors import InvalidTransition
from treadle.domain.sandbox import (
    IDLE_CPU_CORES,
    Desired,
    SandboxSpec,
    SandboxStatus,
    awake_reasons,
    check_home,
    check_takes_work,
)
from treadle.weaver.services import port_access


def test_a_sandbox_is_idle_only_when_nothing_keeps_it_awake() -> None:
    assert awake_reasons(0, {}, None) == []
    assert awake_reasons(0, {"watch": 2, "call": 1}, 0.0) == []  # watching is not work
    assert awake_reasons(0, {}, IDLE_CPU_CORES) == []  # at the threshold: idle
    assert awake_reasons(1, {}, None) == ["1 process running"]
    assert awake_reasons(3, {"exec": 1, "port": 2, "file": 1}, IDLE_CPU_CORES * 2) == [
        "3 processes running",
        "1 exec stream open",
        "2 proxied connections open",
        "1 file transfer open",
        "CPU use above 5% of a core",
    ]


def test_only_a_running_sandbox_that_is_to_go_on_running_takes_work() -> None:
    check_takes_work("sbx", SandboxStatus.RUNNING, Desired.RUNNING)
    for status in set(SandboxStatus) - {SandboxStatus.RUNNING}:
        with pytest.raises(InvalidTransition, match=f"is {status.value}, not running"):
            check_takes_work("sbx", status, Desired.RUNNING)
    # Killed or pausing while its node still runs it: refused from the moment it was asked.
    for desired in (Desired.STOPPED, Desired.PAUSED):
        with pytest.raises(InvalidTransition, match=f"to be {desired.value}") as refused:
            check_takes_work("sbx", SandboxStatus.RUNNING, desired)
        assert refused.value.details == {"id": "sbx", "state": "running", "desired": desired.value}


def test_a_signed_url_opens_one_port_of_one_sandbox_until_it_expires() -> None:
    token, now = "sbt_secret", 1_000_000.0
    expires = int(now) + 60
    signature = port_access.sign(token, "sbx_1", 8000, expires)
    assert port_access.valid_signature(token, "sbx_1", 8000, str(expires), signature, now)
    # Past its expiry, or for another port, sandbox or token: refused.
    assert not port_access.valid_signature(token, "sbx_1", 8000, str(expires), signature, now + 61)
    assert not port_access.valid_signature(token, "sbx_1", 8001, str(expires), signature, now)
    assert not port_access.valid_signature(token, "sbx_2", 8000, str(expires), signature, now)
    assert not port_access.valid_signature("sbt_other", "sbx_1", 8000, str(expires), signature, now)
    # A later expiry with the old signature, or malformed parts: refused.
    assert not port_access.valid_signature(token, "sbx_1", 8000, str(expires + 1), signature, now)
    for expiry in ("", "-5", "1e9", "9" * 13):
        assert not port_access.valid_signature(token, "sbx_1", 8000, expiry, signature, now)
    assert not port_access.valid_signature(None, "sbx_1", 8000, str(expires), signature, now)
    assert not port_access.valid_signature(token, "sbx_1", 8000, str(expires), None, now)


def test_an_access_token_is_compared_whole() -> None:
    assert port_access.valid_token("sbt_abc", "sbt_abc")
    assert not port_access.valid_token("sbt_abc", "sbt_ab")
    assert not port_access.valid_token("sbt_abc", "")
    assert not port_access.valid_token(None, "sbt_abc")
    assert not port_access.valid_token("", "")


def test_what_an_agent_says_of_its_activity_is_held_to_its_shape() -> None:
    from treadle.shuttle.live.host import _activity

    assert _activity({"processes": 2, "ticks": 150, "hz": 100}) == (2, 150, 100)
    assert _activity({"processes": 10**9, "ticks": 1, "hz": 100})[0] == 1_000_000
    for forged in (
        None,
        [],
        {"processes": -1, "ticks": 1, "hz": 100},
        {"processes": 1, "ticks": 1.5, "hz": 100},
        {"processes": True, "ticks": 1, "hz": 100},
        {"processes": 1, "ticks": 1, "hz": 0},
        {"processes": "1", "ticks": 1, "hz": 100},
        {"ticks": 1, "hz": 100},
    ):
        assert _activity(forged) == (0, None, 100), forged


def test_a_node_s_activity_report_is_bounded() -> None:
    import pytest
    from pydantic import ValidationError

    from treadle.protocol import SandboxActivity

    def report(**fields: object) -> SandboxActivity:
        return SandboxActivity.model_validate({"id": "sbx_1", "incarnation": 1, **fields})

    assert report(reasons=["r" * 256] * 8, idle_for_s=0).reasons[0] == "r" * 256
    for bad in (
        {"reasons": ["r"] * 9},
        {"reasons": ["r" * 257]},
        {"idle_for_s": -1},
        {"idle_for_s": float("inf")},
        {"idle_for_s": float("nan")},
    ):
        with pytest.raises(ValidationError):
            report(**bad)


@pytest.mark.parametrize(
    "home", ["/work", "/home/user", "/root", "/a/b/c/d/e/f/g/h", "/" + "x" * 64, "/srv/app.v2"]
)
def test_a_home_of_plain_names_is_taken(home: str) -> None:
    assert check_home(home) == home
    assert SandboxSpec(home=home).home == home


@pytest.mark.parametrize(
    "home",
    [
        "/",
        "home/user",
        "/home/../etc",
        "/home/./user",
        "/a/b/c/d/e/f/g/h/i",  # nine names: one past the limit
        "/" + "x" * 65,
        "/home//user",
        "/home/user/",
        "/proc/self",
        "/usr/local",
        "/tmp",
        "/.treadle/agent",
        "/etc",
        "/home/us er",
        "/home/user\x00",
    ],
)
def test_a_home_anywhere_else_is_refused(home: str) -> None:
    with pytest.raises(ValueError):
        check_home(home)
    with pytest.raises(ValidationError):
        SandboxSpec(home=home)
