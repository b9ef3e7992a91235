"""`treadle fn create`: turning --command / --file and the options into a function spec."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import typer

from treadle.cli.functions import build_spec, infer_command
from treadle.domain.function import FunctionSpec


@pytest.mark.parametrize(
    ("filename", "text", "command"),
    [
        ("job.py", "print(1)\n", ["python3", "job.py"]),
        ("job.sh", "echo 1\n", ["sh", "job.sh"]),
        ("JOB.PY", "print(1)\n", ["python3", "JOB.PY"]),
        ("job.py", "#!/usr/bin/env python3\nprint(1)\n", ["./job.py"]),
        ("run", "#!/bin/sh\necho 1\n", ["./run"]),
    ],
)
def test_command_inferred_from_shebang_then_extension(
    filename: str, text: str, command: list[str]
) -> None:
    assert infer_command(filename, text) == command


def test_unknown_script_asks_for_command() -> None:
    with pytest.raises(typer.BadParameter, match="--command"):
        infer_command("job.rb", "puts 1\n")


def test_command_string_is_split_like_a_shell() -> None:
    spec = build_spec("add", command='python3 -c "print(4 + 9)"')
    assert spec == {"name": "add", "command": ["python3", "-c", "print(4 + 9)"]}


def test_script_file_becomes_the_source(tmp_path: Path) -> None:
    script = tmp_path / "main.py"
    script.write_text("print(13)\n")
    spec = build_spec("add", file=script)
    assert spec == {
        "name": "add",
        "source": "print(13)\n",
        "source_name": "main.py",
        "command": ["python3", "main.py"],
    }


def test_explicit_command_wins_over_inference(tmp_path: Path) -> None:
    script = tmp_path / "tool.rb"
    script.write_text("puts 1\n")
    spec = build_spec("t", file=script, command="ruby tool.rb")
    assert spec["command"] == ["ruby", "tool.rb"]
    assert spec["source_name"] == "tool.rb"


def test_json_spec_file_with_name_and_options_overriding(tmp_path: Path) -> None:
    path = tmp_path / "fn.json"
    path.write_text(
        json.dumps(
            {
                "name": "old",
                "command": ["echo", "1"],
                "env": {"A": "1", "B": "2"},
                "resources": {"cpu_millicores": 500, "disk_mib": 10},
            }
        )
    )
    spec = build_spec("new", file=path, env=["B=3"], memory=64, timeout=5, isolation="namespace")
    assert spec == {
        "name": "new",
        "command": ["echo", "1"],
        "env": {"A": "1", "B": "3"},
        "resources": {"cpu_millicores": 500, "disk_mib": 10, "memory_mib": 64},
        "timeout_s": 5,
        "isolation": "namespace",
    }


def test_min_isolation_option_goes_into_the_spec() -> None:
    spec = build_spec("f", command="echo hi", min_isolation="oci")
    assert spec == {"name": "f", "command": ["echo", "hi"], "min_isolation": "oci"}


def test_yaml_spec_file(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "fn.yaml"
    path.write_text("command: [echo, hi]\nmax_attempts: 1\n")
    assert build_spec("hi", file=path) == {
        "name": "hi",
        "command": ["echo", "hi"],
        "max_attempts": 1,
    }


def test_yaml_without_pyyaml_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    path = tmp_path / "fn.yml"
    path.write_text("command: [echo]\n")
    with pytest.raises(typer.BadParameter, match="PyYAML"):
        build_spec("f", file=path)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_json_spec_must_be_an_object(tmp_path: Path, content: str) -> None:
    path = tmp_path / "fn.json"
    path.write_text(content)
    with pytest.raises(typer.BadParameter):
        build_spec("f", file=path)


def test_spec_without_any_command_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fn.json"
    path.write_text('{"env": {}}')
    with pytest.raises(typer.BadParameter, match="--command"):
        build_spec("f", file=path)


@pytest.mark.parametrize("command", ["", "   ", "'unterminated"])
def test_bad_command_string(command: str) -> None:
    with pytest.raises(typer.BadParameter):
        build_spec("f", command=command)


def test_nothing_to_run() -> None:
    with pytest.raises(typer.BadParameter, match="--command or --file"):
        build_spec("f")


def test_placement_options_fill_the_placement_and_keep_the_files(tmp_path: Path) -> None:
    path = tmp_path / "fn.json"
    path.write_text('{"command": ["true"], "placement": {"labels": {"disk": "ssd"}}}')
    spec = build_spec(
        "p",
        file=path,
        strategy="lowest_cost",
        countries=["DE", "FR"],
        max_price=0.5,
        gpus="1:l4",
        image="127.0.0.1:5000/tools:1",
        network=True,
    )
    assert spec["placement"] == {
        "labels": {"disk": "ssd"},
        "strategy": "lowest_cost",
        "countries": ["DE", "FR"],
        "max_price_per_hour": 0.5,
        "gpu": {"count": 1, "type": "l4"},
    }
    assert (spec["image"], spec["network"]) == ("127.0.0.1:5000/tools:1", True)
    assert FunctionSpec.model_validate(spec).resources.gpu_count == 1


def test_gpus_must_start_with_a_count() -> None:
    with pytest.raises(typer.BadParameter, match="COUNT"):
        build_spec("p", command="true", gpus="l4")
