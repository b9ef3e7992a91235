"""Where the SDK finds its URL and API key: argument > environment > `treadle up`'s key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.client import Client, TreadleConfigError
from treadle.client.config import DEFAULT_URL, admin_key_path, load_config, treadle_home


def _home_with_key(tmp_path: Path, key: str) -> dict[str, str]:
    (tmp_path / "admin.key").write_text(key)
    return {"TREADLE_HOME": str(tmp_path)}


def test_defaults_without_environment(tmp_path: Path) -> None:
    config = load_config(env={"TREADLE_HOME": str(tmp_path)})
    assert config.url == DEFAULT_URL
    assert config.api_key is None


def test_url_argument_beats_environment() -> None:
    env = {"TREADLE_URL": "http://env:1", "TREADLE_HOME": "/nonexistent"}
    assert load_config(env=env).url == "http://env:1"
    assert load_config("http://arg:2/", env=env).url == "http://arg:2"


def test_key_precedence_argument_then_environment_then_file(tmp_path: Path) -> None:
    env = _home_with_key(tmp_path, "tk_file\n")
    assert load_config(env=env).api_key == "tk_file"
    env["TREADLE_API_KEY"] = "tk_env"
    assert load_config(env=env).api_key == "tk_env"
    assert load_config(api_key="tk_arg", env=env).api_key == "tk_arg"


def test_blank_key_file_counts_as_missing(tmp_path: Path) -> None:
    assert load_config(env=_home_with_key(tmp_path, " \n")).api_key is None


def test_home_falls_back_to_xdg_data_home_then_home_dir() -> None:
    assert treadle_home({"TREADLE_HOME": "/srv/t", "XDG_DATA_HOME": "/x"}) == Path("/srv/t")
    assert treadle_home({"XDG_DATA_HOME": "/x"}) == Path("/x/treadle")
    assert treadle_home({}) == Path.home() / ".local/share/treadle"
    assert admin_key_path({"XDG_DATA_HOME": "/x"}) == Path("/x/treadle/admin.key")


def test_missing_key_error_says_how_to_get_one(tmp_path: Path) -> None:
    config = load_config(env={"TREADLE_HOME": str(tmp_path)})
    with pytest.raises(TreadleConfigError) as raised:
        config.require_api_key()
    message = str(raised.value)
    assert "treadle up" in message
    assert "TREADLE_API_KEY" in message
    assert str(tmp_path / "admin.key") in message


def test_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "admin.key").mkdir()  # reading a directory fails with an OSError
    with pytest.raises(TreadleConfigError, match=r"admin\.key"):
        load_config(env={"TREADLE_HOME": str(tmp_path)})


def test_repr_hides_the_key() -> None:
    config = load_config(api_key="tk_secret", env={})
    assert "tk_secret" not in repr(config)


def test_client_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TREADLE_HOME", str(tmp_path))
    monkeypatch.delenv("TREADLE_API_KEY", raising=False)
    monkeypatch.setenv("TREADLE_URL", "http://from-env:8700")
    (tmp_path / "admin.key").write_text("tk_up\n")
    with Client() as client:
        assert client.config.url == "http://from-env:8700"
        assert client.config.api_key == "tk_up"
