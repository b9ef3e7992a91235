"""`--arg` / `--args` / `--env` parsing."""

from __future__ import annotations

import pytest
import typer

from treadle.cli.params import parse_arg_value, parse_args, parse_env


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", 4),
        ("4.5", 4.5),
        ("true", True),
        ("null", None),
        ('"4"', "4"),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ("hello", "hello"),
        ("", ""),
        ("NaN", "NaN"),  # not JSON the API accepts: kept as text
        ("Infinity", "Infinity"),
        ("a=b", "a=b"),
    ],
)
def test_arg_value_is_json_when_it_parses(text: str, value: object) -> None:
    assert parse_arg_value(text) == value
    assert type(parse_arg_value(text)) is type(value)


def test_pairs_merge_over_the_json_object() -> None:
    args = parse_args('{"x": 1, "y": 2}', ["x=4", "s=hello", "eq=a=b"])
    assert args == {"x": 4, "y": 2, "s": "hello", "eq": "a=b"}


def test_no_arguments_is_an_empty_object() -> None:
    assert parse_args(None, []) == {}


@pytest.mark.parametrize("bad", ["[1]", "not json", "4"])
def test_args_must_be_a_json_object(bad: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_args(bad, [])


@pytest.mark.parametrize("bad", ["novalue", "=4"])
def test_arg_needs_a_key_and_an_equals_sign(bad: str) -> None:
    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        parse_args(None, [bad])


def test_env_values_stay_strings() -> None:
    assert parse_env(["N=4", "EMPTY=", "URL=a=b"]) == {"N": "4", "EMPTY": "", "URL": "a=b"}
