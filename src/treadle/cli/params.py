"""Parsing of `KEY=VALUE` options: `--arg` (JSON-typed values) and `--env` (strings)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import typer

__all__ = ["parse_arg_value", "parse_args", "parse_env", "split_pair"]


def split_pair(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
    return key, value


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity, which no strict JSON parser (the API's) does.
    raise ValueError(name)


def parse_arg_value(text: str) -> Any:
    """The value as JSON when it parses (`4` → 4, `true` → True, `[1]` → [1]), else the text."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def parse_args(args_json: str | None, pairs: Iterable[str]) -> dict[str, Any]:
    """Merge `--arg k=v` pairs over the `--args` JSON object."""
    args: dict[str, Any] = {}
    if args_json is not None:
        try:
            loaded = json.loads(args_json, parse_constant=_reject_constant)
        except ValueError as exc:
            raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--args") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--args")
        args.update(loaded)
    for item in pairs:
        key, value = split_pair(item, "--arg")
        args[key] = parse_arg_value(value)
    return args


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    return dict(split_pair(item, "--env") for item in pairs)
