"""Images for the `oci` and `gvisor` tiers: OCI layouts unpacked with umoci, registry images
copied with skopeo from a real registry on loopback, cached by digest and shared read-only,
then run for real (busybox built from the host's `busybox-static`)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support.cluster import free_port
from support.oci import KINDS, OciHarness, harness_for, oci_base  # noqa: F401
from support.registry import Registry, build_busybox_layout, registry, require  # noqa: F401
from treadle.shuttle.oci.images import ImageError, ImageStore, parse_reference
from treadle.shuttle.oci.rootfs import MOUNT_POINTS, Rootfs

REPOSITORY = "treadle/busybox"


@pytest.fixture(scope="module")
def layout(oci_base: Path) -> Path:  # noqa: F811
    require("umoci", "/bin/busybox")
    path = build_busybox_layout(oci_base / "layout", "v1")
    return path


@pytest.fixture(scope="module")
def pushed(registry: Registry, layout: Path) -> str:  # noqa: F811
    return registry.push(layout, "v1", REPOSITORY)


@pytest.fixture
def store(oci_base: Path, request: pytest.FixtureRequest) -> Iterator[ImageStore]:  # noqa: F811
    # Under the harness's traversable base: runsc's gofer opens the rootfs unprivileged.
    cache = oci_base / "caches" / request.node.name.replace("[", "-").replace("]", "")
    yield ImageStore(cache, insecure_registries=_insecure(request))
    shutil.rmtree(cache, ignore_errors=True)


def _insecure(request: pytest.FixtureRequest) -> list[str]:
    if "registry" in request.fixturenames:
        return [request.getfixturevalue("registry").host]
    return []


@pytest.fixture(scope="module", params=KINDS)
def oci(request: pytest.FixtureRequest, oci_base: Path) -> Iterator[OciHarness]:  # noqa: F811
    yield from harness_for(request.param, oci_base)


def _manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor["annotations"]["org.opencontainers.image.ref.name"] == tag:
            digest: str = descriptor["digest"]
            return digest
    raise AssertionError(f"no {tag} in {layout}")


# References


@pytest.mark.parametrize(
    ("reference", "location", "tag"),
    [
        ("127.0.0.1:5000/a/b:v2", "127.0.0.1:5000/a/b", "v2"),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b", None),
        ("busybox:1.36", "busybox", "1.36"),
    ],
)
def test_parse_reference(reference: str, location: str, tag: str | None) -> None:
    parsed = parse_reference(reference)
    assert (parsed.location, parsed.tag) == (location, tag)


def test_parse_reference_registry_host_and_digest() -> None:
    digest = "sha256:" + "a" * 64
    parsed = parse_reference(f"localhost:5000/x@{digest}")
    assert (parsed.registry, parsed.digest) == ("localhost:5000", digest)
    assert parsed.skopeo_source() == f"docker://localhost:5000/x@{digest}"
    assert parse_reference("busybox").registry is None


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "x://y",
        "host/name:bad tag",
        "a@sha256:12",
        # Layouts and transports name paths on the node: only its operator may use them.
        "oci:/images/busybox:v1",
        "oci:1234/x",
        "/images/busybox:v1",
        "./rel/dir",
        "docker://127.0.0.1:5000/a/b:v2",
    ],
)
def test_bad_references_are_refused(reference: str) -> None:
    with pytest.raises(ImageError):
        parse_reference(reference)


# OCI layouts


def test_layout_is_unpacked_once_named_by_its_digest(store: ImageStore, layout: Path) -> None:
    first = store.resolve_layout(layout, "v1")
    digest = _manifest_digest(layout, "v1")
    assert (first.digest, first.cached) == (digest, False)
    assert first.path.parent.name == digest.replace(":", "-")
    assert not first.path.is_symlink()
    assert (first.path / "bin" / "busybox").is_file()
    assert all((first.path / p.lstrip("/")).is_dir() for p in MOUNT_POINTS)
    assert first.env == ("PATH=/bin",)
    second = store.resolve_layout(layout)  # its only tag
    assert (second.path, second.cached) == (first.path, True)
    assert store.cached_digests() == [digest]
    assert list((store.cache_dir / "tmp").iterdir()) == []


def test_concurrent_resolutions_share_one_copy(oci_base: Path, layout: Path) -> None:  # noqa: F811
    cache = oci_base / "caches" / "concurrent"
    # Separate stores (as separate Shuttles would be): only the rename keeps them apart.
    stores = [ImageStore(cache) for _ in range(4)]
    start = threading.Barrier(len(stores))

    def resolve(store: ImageStore) -> Rootfs:
        start.wait()
        return store.resolve_layout(layout, "v1")

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            results = list(pool.map(resolve, stores))
        assert len({r.path for r in results}) == 1
        assert (results[0].path / "bin" / "busybox").is_file()
        assert stores[0].cached_digests() == [_manifest_digest(layout, "v1")]
        assert list((cache / "tmp").iterdir()) == []
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_bad_layouts_are_named_in_the_error(
    store: ImageStore, layout: Path, tmp_path: Path
) -> None:
    with pytest.raises(ImageError, match="no such OCI layout directory") as missing:
        store.resolve_layout(tmp_path / "nothing", "v1")
    assert missing.value.image == f"{tmp_path}/nothing:v1"
    with pytest.raises(ImageError, match="not an OCI image layout"):
        store.resolve_layout(tmp_path, "v1")
    with pytest.raises(ImageError, match=r"no image tagged 'v9'.*tags: v1"):
        store.resolve_layout(layout, "v9")
    broken = tmp_path / "broken"
    shutil.copytree(layout, broken)
    digest = _manifest_digest(broken, "v1").removeprefix("sha256:")
    (broken / "blobs" / "sha256" / digest).write_text("{}")
    with pytest.raises(ImageError, match="does not match its digest"):
        store.resolve_layout(broken, "v1")


# Registries


def test_registry_image_runs_and_is_pulled_once(
    oci: OciHarness,
    store: ImageStore,
    registry: Registry,  # noqa: F811
    pushed: str,
) -> None:
    before = registry.blob_downloads(REPOSITORY)
    first = store.resolve(pushed)
    downloaded = registry.blob_downloads(REPOSITORY)
    assert not first.cached
    assert downloaded > before
    run = oci.run(["busybox", "echo", "13"], rootfs=first)
    assert (run.exit_code, run.stdout) == (0, b"13\n"), run.stderr

    second = store.resolve(pushed)
    assert (second.path, second.digest, second.cached) == (first.path, first.digest, True)
    assert registry.blob_downloads(REPOSITORY) == downloaded
    run = oci.run(["sh", "-c", 'echo "$PATH"; echo 13 >&3'], rootfs=second)
    assert (run.exit_code, run.stdout, run.result) == (0, b"/bin\n", b"13\n"), run.stderr


def test_pull_always_fetches_again_and_reuses_the_rootfs(
    store: ImageStore,
    registry: Registry,  # noqa: F811
    pushed: str,
) -> None:
    first = store.resolve(pushed)
    downloaded = registry.blob_downloads(REPOSITORY)
    again = store.resolve(pushed, pull="always")
    assert registry.blob_downloads(REPOSITORY) > downloaded
    assert (again.path, again.cached) == (first.path, True)


def test_registry_errors_name_the_image_and_the_cause(
    store: ImageStore,
    registry: Registry,  # noqa: F811
) -> None:
    unknown = f"{registry.host}/{REPOSITORY}:nope"
    with pytest.raises(ImageError, match="no such image in the registry") as caught:
        store.resolve(unknown)
    assert caught.value.image == unknown
    with pytest.raises(ImageError, match="registry unreachable"):
        store.resolve(f"127.0.0.1:{free_port()}/x/y:v1")
    strict = ImageStore(store.cache_dir)  # the loopback registry is not listed as insecure
    with pytest.raises(ImageError, match="insecure_registries"):
        strict.resolve(f"{registry.host}/{REPOSITORY}:v1")


# The host


def test_host_rootfs_binds_the_host_system_read_only(store: ImageStore) -> None:
    rootfs = store.resolve(None)
    assert "/usr" in rootfs.binds
    assert rootfs.digest is None
    assert all((rootfs.path / p.lstrip("/")).is_dir() for p in MOUNT_POINTS)
    for bind in rootfs.binds:
        assert (rootfs.path / bind.lstrip("/")).exists()  # a mount point for each
    assert not any((rootfs.path / "usr").iterdir())  # an empty one: the host's comes later
    assert store.host_rootfs().path == rootfs.path


def test_host_rootfs_runs(oci: OciHarness, store: ImageStore) -> None:
    script = "id -un; test -x /usr/bin/python3 && echo python"
    run = oci.run(["/bin/sh", "-c", script], rootfs=store.resolve(None))
    # The same users, by the same names, as the namespace tier's sandboxes.
    assert (run.exit_code, run.stdout) == (0, b"user\npython\n"), run.stderr
