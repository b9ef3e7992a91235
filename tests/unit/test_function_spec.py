"""Function specs are validated once, at registration; commands render args safely."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from treadle.domain.errors import InvalidRequest
from treadle.domain.function import FunctionSpec, placeholders, render_command
from treadle.domain.resources import Resources, Tier


def test_minimal_spec_gets_defaults() -> None:
    spec = FunctionSpec(name="add", command=["python3", "-c", "print(4 + 9)"])
    assert spec.timeout_s == 300
    assert spec.max_attempts == 3
    assert spec.resources == Resources()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Bad Name", "command": ["x"]}, "name"),
        ({"name": "ok", "command": []}, "command"),
        ({"name": "ok", "command": [""]}, "command"),
        ({"name": "ok", "command": ["x"], "env": {"1BAD": "v"}}, "env"),
        ({"name": "ok", "command": ["x"], "env": {"TREADLE_ARGS_FILE": "v"}}, "env"),
        ({"name": "ok", "command": ["x"], "timeout_s": 0}, "timeout_s"),
        ({"name": "ok", "command": ["x"], "isolation": "chroot"}, "isolation"),
        ({"name": "ok", "command": ["x"], "min_isolation": "strong"}, "min_isolation"),
        (
            {"name": "ok", "command": ["x"], "isolation": "oci", "min_isolation": "namespace"},
            "min_isolation",
        ),
        ({"name": "ok", "command": ["x"], "surprise": 1}, "surprise"),
        ({"name": "ok", "command": ["x"], "resources": {"gpu_type": "h100"}}, "resources"),
        ({"name": "ok", "command": ["x"], "source_name": "../escape"}, "source_name"),
    ],
)
def test_bad_specs_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        FunctionSpec.model_validate(body)
    assert any(err["loc"][0] == field for err in info.value.errors())


def test_render_substitutes_strings_as_is_and_other_values_as_json() -> None:
    argv = render_command(
        ["echo", "{a}", "x={b}", "{c}", "{{literal}}"], {"a": "hi there", "b": 4, "c": [1, 2]}
    )
    assert argv == ["echo", "hi there", "x=4", "[1,2]", "{literal}"]


def test_render_names_every_missing_arg() -> None:
    with pytest.raises(InvalidRequest) as info:
        render_command(["echo", "{a}", "{b}", "{c}"], {"b": 1})
    assert "a, c" in info.value.message
    assert [d["loc"][-1] for d in info.value.details] == ["a", "c"]


def test_render_does_not_evaluate_attribute_or_index_lookups() -> None:
    # str.format would walk `{a.__class__}`; only bare identifiers are placeholders.
    assert placeholders(["{a.__class__}", "{a[0]}", "{a}"]) == {"a"}
    assert render_command(["{a.__class__}", "{a}"], {"a": "x"}) == ["{a.__class__}", "x"]


@pytest.mark.parametrize(
    ("fields", "floor"),
    [
        ({}, None),
        ({"min_isolation": "namespace"}, Tier.NAMESPACE),
        ({"image": "registry.local:5000/team/tool:1.2"}, Tier.OCI),
        ({"image": "busybox", "min_isolation": "namespace"}, Tier.OCI),
        ({"image": "busybox", "min_isolation": "gvisor"}, Tier.GVISOR),
    ],
)
def test_an_image_raises_the_weakest_tier_to_oci(fields: dict[str, str], floor: Tier) -> None:
    spec = FunctionSpec(name="f", command=["true"], **fields)  # type: ignore[arg-type]
    assert spec.tier_floor == floor


@pytest.mark.parametrize(
    "image",
    [
        "busybox:1.36",
        "127.0.0.1:5000/treadle/busybox:v1",
        "ghcr.io/org/app@sha256:" + "a" * 64,
    ],
)
def test_registry_references_are_accepted(image: str) -> None:
    assert FunctionSpec(name="f", command=["true"], image=image).image == image


@pytest.mark.parametrize(
    "image",
    [
        "oci:/srv/layout:v1",
        "docker://busybox:1.36",
        "/srv/layout",
        "../layout",
        "http://x/y",
        "a b",
        "Busy/Box",
    ],
)
def test_images_that_are_not_registry_references_are_refused(image: str) -> None:
    with pytest.raises(ValidationError, match="registry reference"):
        FunctionSpec(name="f", command=["true"], image=image)
