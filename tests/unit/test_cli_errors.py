"""How the CLI reports failures: a one-line `error:` and an exit code, never a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treadle.cli.main import app


@pytest.fixture
def refusing_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_HOME", str(tmp_path))
    monkeypatch.delenv("TREADLE_API_KEY", raising=False)
    monkeypatch.delenv("TREADLE_URL", raising=False)


def test_unreachable_server_is_one_error_line(refusing_url: str) -> None:
    result = CliRunner().invoke(app, ["--url", refusing_url, "--api-key", "tk", "fn", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach treadle at {refusing_url}")
    assert "treadle up" in result.stderr
    assert "Traceback" not in result.output


def test_missing_key_is_reported_before_any_request(refusing_url: str) -> None:
    result = CliRunner().invoke(app, ["--url", refusing_url, "ps"])
    assert result.exit_code == 1
    assert "error: no API key" in result.stderr
    assert "TREADLE_API_KEY" in result.stderr


def test_usage_errors_exit_2() -> None:
    result = CliRunner().invoke(app, ["invoke", "add", "--arg", "novalue"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_fn_create_needs_something_to_run() -> None:
    result = CliRunner().invoke(app, ["fn", "create", "add"])
    assert result.exit_code == 2
    assert "--command or --file" in result.output


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["weaver", "--port", "99999"], "port"),
        (["weaver", "--default-min-isolation", "chroot"], "default_min_isolation"),
        (["shuttle", "--weaver", "ftp://x", "--token", "t"], "weaver_url"),
        (["shuttle", "--weaver", "http://h:1", "--runtime", "chroot"], "runtimes"),
        (["shuttle", "--weaver", "http://h:1", "--sandbox-ids-base", "0"], "sandbox_ids_base"),
        # one past the last base whose 1,024 ranges of 65,536 ids fit the kernel's ids
        (
            ["shuttle", "--weaver", "http://h:1", "--sandbox-ids-base", str(2**31 - 2**26 + 1)],
            "sandbox_ids_base",
        ),
    ],
)
def test_bad_server_settings_are_one_clear_error(argv: list[str], named: str) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert f"error: {named}" in result.output
    assert "Traceback" not in result.output
