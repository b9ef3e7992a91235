"""A function's image in the microvm tier, through the API: the node pulls it from a registry
(a real one on loopback) and unpacks it once, as for the oci tiers, and the guest's root is
the image, shared read-only: its programs and its configured PATH, nothing of the host's,
on the guest's own kernel."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.test_executions import output, register, run
from support.cluster import Cluster
from support.registry import Registry, push_busybox, registry  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.microvm]

REPOSITORY = "treadle/microvm-busybox"


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    return push_busybox(registry, tmp_path_factory.mktemp("busybox"), REPOSITORY)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    package: Path,
    registry: Registry,  # noqa: F811
) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("microvm-images"))
    try:
        cluster.start_weaver(process_tier=False)
        tiers = ("--runtime", "microvm", "--microvm", "--insecure-registry", registry.host)
        cluster.start_shuttle("vm-images", *tiers, "--cpu", "4000", "--memory", "4096")
        yield cluster
    finally:
        cluster.stop()


def test_a_function_runs_in_its_image_in_a_vm_of_its_own(cluster: Cluster, image: str) -> None:
    with cluster.client() as api:
        register(
            api,
            "vm-image",
            [
                "sh",
                "-c",
                # PATH comes from the image's config; the host's python is not in it.
                'echo "$PATH"; test -e /usr/bin/python3 && echo host || echo image; uname -r;'
                ' cat "$TREADLE_ARGS_FILE"; echo 13 >&3',
            ],
            isolation="microvm",
            image=image,
        )
        done = run(api, "vm-image", {"args": {"x": 1}})
        assert (done["state"], done["isolation"], done["result"]) == ("success", "microvm", 13)
        path, root, kernel, args = output(api, done["id"])["stdout"].splitlines()
        assert (path, root, args) == ("/bin", "image", '{"x": 1}')
        assert kernel != platform.release()
