"""Functions that name an image: Weaver places them only on nodes with a container tier, and
Shuttle pulls the image from a registry (a real one on loopback), unpacks it once and runs
the function in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.cluster import Cluster, eventually
from support.registry import Registry, push_busybox, registry  # noqa: F401
from support.runtimes import shuttle_settings
from treadle.domain.resources import Tier
from treadle.shuttle.runtimes import available_runtimes

pytestmark = pytest.mark.integration

REPOSITORY = "treadle/fn-busybox"


def _has(tier: Tier) -> bool:
    return tier in available_runtimes(shuttle_settings(Path("/nonexistent")))


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    return push_busybox(registry, tmp_path_factory.mktemp("busybox"), REPOSITORY)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (_has(Tier.OCI) and _has(Tier.NAMESPACE)):
        pytest.skip("needs the namespace and oci tiers (bubblewrap, crun or runc)")
    c = Cluster(tmp_path_factory.mktemp("images"))
    try:
        c.start_weaver()
        yield c
    finally:
        c.stop()


def _invoke(api: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    response = api.post(f"/v1/functions/{name}/invoke", json=body)
    assert response.status_code in (200, 201, 202), response.text
    return dict(response.json())


def _finished(api: httpx.Client, execution_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        execution = dict(api.get(f"/v1/executions/{execution_id}").json())
        ended = execution["state"] in ("success", "failure", "timeout", "cancelled")
        return execution if ended else None

    # The first run pulls and unpacks the image.
    return eventually(ended, timeout=120, what=f"execution {execution_id} to end")


def _output(api: httpx.Client, execution_id: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/executions/{execution_id}/output").json())


def test_an_image_function_waits_for_a_container_node_then_runs_in_its_image(
    cluster: Cluster,
    registry: Registry,  # noqa: F811
    image: str,
) -> None:
    cluster.start_shuttle("bubble", "--runtime", "namespace")
    with cluster.client() as api:
        created = api.post(
            "/v1/functions",
            json={
                "name": "in-image",
                # PATH comes from the image's config; the host's python is not in it.
                "command": [
                    "sh",
                    "-c",
                    'echo "$PATH"; test -e /usr/bin/python3 && echo host || echo image',
                ],
                "image": image,
            },
        )
        assert created.status_code == 201, created.text
        waiting = _invoke(api, "in-image")
        reason = eventually(
            lambda: api.get(f"/v1/executions/{waiting['id']}").json()["pending_reason"],
            what="a reason why the image function is not placed",
        )
        assert "at least oci" in reason
        assert api.get(f"/v1/executions/{waiting['id']}").json()["state"] == "open"

        cluster.start_shuttle("boxes", "--runtime", "oci", "--insecure-registry", registry.host)
        first = _finished(api, waiting["id"])
        assert (first["state"], first["exit_code"]) == ("success", 0), _output(api, first["id"])
        assert first["isolation"] == "oci"
        assert _output(api, first["id"])["stdout"] == "/bin\nimage\n"

        # Pulled once per node: later executions find it unpacked.
        downloads = registry.blob_downloads(REPOSITORY)
        again = _finished(api, _invoke(api, "in-image")["id"])
        assert again["state"] == "success"
        assert _output(api, again["id"])["stdout"] == "/bin\nimage\n"
        assert registry.blob_downloads(REPOSITORY) == downloads


def test_an_image_that_cannot_be_pulled_fails_the_execution_naming_it(
    cluster: Cluster,
    registry: Registry,  # noqa: F811
    image: str,
) -> None:
    if cluster.node_named("boxes", connected=True) is None:
        cluster.start_shuttle("boxes", "--runtime", "oci", "--insecure-registry", registry.host)
    missing = f"{registry.host}/{REPOSITORY}:nope"
    with cluster.client() as api:
        created = api.post(
            "/v1/functions",
            json={"name": "no-image", "command": ["true"], "image": missing, "max_attempts": 1},
        )
        assert created.status_code == 201, created.text
        failed = _finished(api, _invoke(api, "no-image")["id"])
        assert (failed["state"], failed["error"]) == ("failure", "spawn_failed")
        stderr = _output(api, failed["id"])["stderr"]
        assert missing in stderr
        assert "no such image" in stderr


def test_a_node_pulls_only_from_the_registries_its_operator_allows(
    cluster: Cluster,
    registry: Registry,  # noqa: F811
    image: str,
) -> None:
    cluster.start_shuttle(
        "picky", "--runtime", "oci", "--label", "picky=yes",
        "--insecure-registry", registry.host, "--allow-registry", "registry.example:5000",
    )  # fmt: skip
    with cluster.client() as api:
        created = api.post(
            "/v1/functions",
            json={
                "name": "elsewhere",
                "command": ["true"],
                "image": image,
                "max_attempts": 1,
                "placement": {"labels": {"picky": "yes"}},
            },
        )
        assert created.status_code == 201, created.text
        failed = _finished(api, _invoke(api, "elsewhere")["id"])
        assert (failed["state"], failed["error"]) == ("failure", "spawn_failed")
        assert "not one this node pulls from" in _output(api, failed["id"])["stderr"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image": "oci:/etc"}, "registry reference"),
        ({"image": "/var/lib/images/x"}, "registry reference"),
        ({"image": "busybox", "isolation": "namespace"}, "not namespace"),
    ],
)
def test_image_mistakes_are_refused_naming_the_field(
    cluster: Cluster, fields: dict[str, str], message: str
) -> None:
    with cluster.client() as api:
        response = api.post("/v1/functions", json={"name": "bad", "command": ["true"], **fields})
    assert response.status_code == 422
    assert message in response.text
