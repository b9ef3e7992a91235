"""Shuttle's small pure parts: settings, credentials, backoff, output decoding, capacity."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from treadle.shuttle.backoff import Backoff
from treadle.shuttle.capacity import detect_capacity
from treadle.shuttle.credentials import NodeCredential, load_credential, save_credential
from treadle.shuttle.gpus import Gpu
from treadle.shuttle.output import CHUNK_MAX_CHARS, OutputDecoder
from treadle.shuttle.settings import ShuttleSettings


@pytest.mark.parametrize(
    ("url", "agent"),
    [
        ("http://127.0.0.1:8700", "ws://127.0.0.1:8700/v1/agent"),
        ("https://weaver.example/", "wss://weaver.example/v1/agent"),
        ("https://example.com/treadle", "wss://example.com/treadle/v1/agent"),
        ("ws://h:1/v1/agent", "ws://h:1/v1/agent"),
    ],
)
def test_agent_url_is_derived_from_the_weaver_url(url: str, agent: str) -> None:
    assert ShuttleSettings(weaver_url=url).agent_url == agent


@pytest.mark.parametrize("url", ["127.0.0.1:8700", "ftp://h", "http://"])
def test_weaver_url_must_be_http_or_ws(url: str) -> None:
    with pytest.raises(ValidationError):
        ShuttleSettings(weaver_url=url)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_HOME", "/srv/treadle")
    monkeypatch.setenv("TREADLE_SHUTTLE_WEAVER_URL", "http://w:1")
    monkeypatch.setenv("TREADLE_SHUTTLE_TOKEN", "tok-secret")
    monkeypatch.setenv("TREADLE_SHUTTLE_LABELS", '{"gpu": "no"}')
    monkeypatch.setenv("TREADLE_SHUTTLE_ALLOW_PROCESS_RUNTIME", "1")

    settings = ShuttleSettings()

    assert settings.home == Path("/srv/treadle/shuttle")
    assert settings.token == "tok-secret"
    assert settings.labels == {"gpu": "no"}
    assert settings.allow_process_runtime
    assert settings.max_unacked_bytes == 8 * 1024 * 1024
    assert "tok-secret" not in repr(settings)


def test_credential_round_trip_is_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert load_credential(home) is None

    save_credential(home, NodeCredential("nd_1", "first"))
    save_credential(home, NodeCredential("nd_1", "second"))

    assert load_credential(home) == NodeCredential("nd_1", "second")
    assert stat.S_IMODE((home / "node.json").stat().st_mode) == 0o600
    assert os.listdir(home) == ["node.json"]
    assert "second" not in repr(load_credential(home))


def test_a_corrupt_credential_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "node.json").write_text("{not json")
    assert load_credential(tmp_path) is None


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    high = Backoff(0.1, 5.0, rng=lambda: 0.999999)
    assert [round(high.next(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    low = Backoff(0.1, 5.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(2)] == [0.05, 0.1]
    low.reset()
    assert low.next() == 0.05
    assert low.longest() == 2.5


def test_decoder_keeps_split_characters_whole_per_stream() -> None:
    decoder = OutputDecoder()
    euro = "€".encode()

    assert decoder.feed("stdout", euro[:1]) == []
    assert decoder.feed("stderr", b"e" + euro[:2]) == ["e"]
    assert decoder.feed("stdout", euro[1:]) == ["€"]
    assert decoder.feed("stderr", euro[2:]) == ["€"]


def test_decoder_replaces_invalid_and_truncated_bytes() -> None:
    decoder = OutputDecoder()

    assert decoder.feed("stdout", b"a\xffb\xe2\x82") == ["a\ufffdb"]
    assert decoder.finish() == [("stdout", "\ufffd")]


def test_decoder_caps_chunk_size() -> None:
    pieces = OutputDecoder().feed("stdout", b"x" * (CHUNK_MAX_CHARS * 2 + 1))

    assert [len(p) for p in pieces] == [CHUNK_MAX_CHARS, CHUNK_MAX_CHARS, 1]


def test_capacity_is_detected_and_overrides_win(tmp_path: Path) -> None:
    detected = detect_capacity(ShuttleSettings(weaver_url="http://w", home=tmp_path / "new"), [])
    assert detected.cpu_millicores == (os.cpu_count() or 1) * 1000
    assert detected.memory_mib > 1
    assert detected.disk_mib > 0
    assert (detected.gpu_count, detected.gpu_type) == (0, None)

    forced = detect_capacity(
        ShuttleSettings(weaver_url="http://w", home=tmp_path, cpu_millicores=500, memory_mib=64),
        [Gpu(0, "GPU-a", "NVIDIA H100 80GB HBM3", 81559), Gpu(1, "GPU-b", "NVIDIA H100", 1)],
    )
    assert (forced.cpu_millicores, forced.memory_mib) == (500, 64)
    assert (forced.gpu_count, forced.gpu_type) == (2, "h100")


def test_several_weaver_replicas_are_comma_separated() -> None:
    settings = ShuttleSettings(weaver_url="http://a:8700, https://b/ ,")
    assert settings.agent_urls == ["ws://a:8700/v1/agent", "wss://b/v1/agent"]
    assert settings.agent_url == "ws://a:8700/v1/agent"


@pytest.mark.parametrize("url", [",", "http://a:1,ftp://b"])
def test_every_replica_address_must_be_valid(url: str) -> None:
    with pytest.raises(ValidationError):
        ShuttleSettings(weaver_url=url)
