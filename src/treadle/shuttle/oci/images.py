"""Root filesystems for the `oci` and `gvisor` tiers (DESIGN §4).

An image is resolved to a directory once and then shared, read-only, by every execution that
names it: the bundle mounts it as `/` with `root.readonly`, so nothing an execution does can
reach the cache. Three kinds of source:

- a registry reference (`host:port/name:tag`, the grammar of `treadle.domain.images`, the
  one Weaver checks a function's image with), copied with `skopeo copy` into a temporary
  layout and then unpacked with `umoci raw unpack`: the only kind a function can name;
- an OCI image layout on disk (`resolve_layout(path, tag)`), unpacked the same way: for the
  node's operator, never reachable from an image reference;
- the host itself (`resolve(None)`): an empty directory whose `/usr` (and `/lib`, `/bin`, ...)
  are read-only bind mounts of the host's, for functions that name no image.

Cache layout under `cache_dir`::

    images/sha256-<hex>/rootfs/     the unpacked root filesystem, named by manifest digest
    images/sha256-<hex>/image.json  what it came from and the image's configured environment
    refs/<hash of reference>.json   registry reference -> manifest digest, so a known image
                                    is used without asking the registry again
    tmp/                            unpacks and copies in progress

An image directory appears in `images/` by an atomic rename of a finished unpack, so a
reader never sees a partial one, and two Shuttles (or threads) resolving the same image at
once both succeed: the second rename fails and its copy is thrown away.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from treadle.domain.errors import TreadleError
from treadle.domain.images import ImageReferenceError, is_tag, parse_image
from treadle.shuttle.oci.rootfs import Rootfs, add_mount_points
from treadle.shuttle.runtimes.bwrap import sandbox_etc

__all__ = [
    "HOST_BINDS",
    "ImageError",
    "ImageReference",
    "ImageStore",
    "Rootfs",
    "parse_reference",
]

# Host directories (or their merged-/usr symlinks) a function without an image gets.
HOST_BINDS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
# Host files under /etc the dynamic loader and Debian's alternatives need to find programs.
_HOST_ETC_BINDS = ("/etc/ld.so.cache", "/etc/alternatives")

_REF_NAME = "org.opencontainers.image.ref.name"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEXES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_COPY_TAG = "treadle"
_HOST_ROOTFS_VERSION = 3


class ImageError(TreadleError):
    """An image could not be resolved; the message names the image and says why."""

    code = "image_error"

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"image {image!r}: {reason}", details={"image": image, "reason": reason})
        self.image = image
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed registry reference. `location` is `registry/repository` as written (skopeo
    applies the docker.io defaults itself)."""

    location: str
    tag: str | None = None
    digest: str | None = None
    registry: str | None = None  # host[:port], None when the reference names none

    def skopeo_source(self) -> str:
        name = f"docker://{self.location}"
        if self.digest:
            return f"{name}@{self.digest}"
        return f"{name}:{self.tag or 'latest'}"


def parse_reference(reference: str) -> ImageReference:
    """A registry reference `[host[:port]/]name[:tag][@sha256:<hex>]`, read by the grammar
    Weaver checked it with (treadle.domain.images); anything else, paths and transports
    included, is an ImageError."""
    try:
        name = parse_image(reference)
    except ImageReferenceError as exc:
        raise ImageError(reference, f"not a registry reference: {exc}") from None
    return ImageReference(name.name, name.tag, name.digest, name.registry)


class ImageStore:
    """Resolves image references to shared read-only root filesystems, cached by digest.

    `insecure_registries` lists the `host:port` registries to talk to over plain HTTP
    without certificate checks (`--src-tls-verify=false`): meant for a registry on
    loopback, never one across a network. `policy` is skopeo's trust policy file (default:
    the system's, /etc/containers/policy.json). Blocking: call it from a worker thread in
    async code.

    Images are named by the digest of the manifest as unpacked, which for a registry image
    is that of skopeo's copy (it may convert a Docker manifest to OCI), not necessarily the
    registry's; `refs/` maps each registry reference to it.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        skopeo: str | None = None,
        umoci: str | None = None,
        insecure_registries: Collection[str] = (),
        policy: Path | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.cache_dir = cache_dir.resolve()
        self._skopeo = skopeo
        self._umoci = umoci
        self._insecure = frozenset(insecure_registries)
        self._policy = policy
        self._timeout_s = timeout_s
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # Public API

    def resolve(
        self, reference: str | None, *, pull: Literal["missing", "always"] = "missing"
    ) -> Rootfs:
        """The root filesystem of registry image `reference` (None: the host's). An image
        already resolved once is used without contacting the registry unless
        `pull="always"`."""
        if reference is None:
            return self.host_rootfs()
        parsed = parse_reference(reference)
        with self._lock(reference):
            return self._from_registry(reference, parsed, pull)

    def resolve_layout(self, layout: Path, tag: str | None = None) -> Rootfs:
        """The root filesystem of image `tag` (by default the only one, or `latest`) of the
        OCI image layout directory `layout`."""
        reference = f"{layout}:{tag}" if tag is not None else str(layout)
        if tag is not None and not is_tag(tag):
            raise ImageError(reference, f"invalid tag {tag!r}")
        with self._lock(f"layout:{reference}"):
            return self._from_layout(reference, layout, tag)

    def host_rootfs(self) -> Rootfs:
        """An empty rootfs whose system directories are bind mounts of the host's: the
        mount points, merged-/usr symlinks as on the host, and a minimal /etc."""
        binds: list[str] = []
        links: dict[str, str] = {}
        for path in HOST_BINDS:
            if os.path.islink(path):
                links[path] = os.readlink(path)
            elif os.path.isdir(path):
                binds.append(path)
        etc_binds = [path for path in _HOST_ETC_BINDS if os.path.exists(path)]
        layout = {"version": _HOST_ROOTFS_VERSION, "binds": binds, "links": links, "etc": etc_binds}
        key = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
        final = self.cache_dir / "images" / f"host-{key}"
        binds += etc_binds
        cached = (final / "rootfs").is_dir()
        if not cached:
            with self._staging() as tree:
                rootfs = tree / "rootfs"
                rootfs.mkdir(mode=0o755)
                for path in binds:
                    target = rootfs / path.lstrip("/")
                    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    if os.path.isdir(path):
                        target.mkdir(mode=0o755)
                    else:
                        target.touch(mode=0o644)
                for path, dest in links.items():
                    os.symlink(dest, rootfs / path.lstrip("/"))
                _write_etc(rootfs / "etc")
                add_mount_points(rootfs)
                _write_json(tree / "image.json", {"reference": "host", "host": layout})
                self._publish("host", tree, final)
        return Rootfs(path=final / "rootfs", reference="host", binds=tuple(binds), cached=cached)

    def cached_digests(self) -> list[str]:
        """Digests of the images unpacked in the cache."""
        images = self.cache_dir / "images"
        if not images.is_dir():
            return []
        return sorted(
            "sha256:" + entry.name.removeprefix("sha256-")
            for entry in images.iterdir()
            if entry.name.startswith("sha256-")
        )

    # Layouts

    def _from_layout(self, reference: str, layout: Path, tag: str | None) -> Rootfs:
        layout = layout.absolute()
        digest, tag = _find_manifest(reference, layout, tag)
        cached = self._load(reference, digest)
        if cached is not None:
            return cached
        env = _image_env(reference, layout, digest)
        return self._unpack(reference, layout, tag, digest, env)

    def _unpack(
        self, reference: str, layout: Path, tag: str, digest: str, env: tuple[str, ...]
    ) -> Rootfs:
        final = self._image_dir(digest)
        with self._staging() as tree:
            rootfs = tree / "rootfs"
            argv = [self._tool(reference, "umoci"), "raw", "unpack"]
            if os.geteuid() != 0:
                argv.append("--rootless")
            argv += ["--image", f"{layout}:{tag}", str(rootfs)]
            self._run(reference, "umoci raw unpack", argv)
            rootfs.chmod(0o755)
            add_mount_points(rootfs)
            _write_json(tree / "image.json", {"reference": reference, "digest": digest, "env": env})
            self._publish(reference, tree, final)
        return Rootfs(path=final / "rootfs", reference=reference, digest=digest, env=env)

    # Registries

    def _from_registry(
        self, reference: str, parsed: ImageReference, pull: Literal["missing", "always"]
    ) -> Rootfs:
        ref_file = self.cache_dir / "refs" / f"{_ref_key(parsed)}.json"
        if pull == "missing":
            digest = _read_ref(ref_file) or parsed.digest
            if digest is not None and (cached := self._load(reference, digest)) is not None:
                return cached
        with self._staging() as staging:
            layout = staging / "layout"
            argv = [self._tool(reference, "skopeo")]
            if self._policy is not None:
                argv += ["--policy", str(self._policy)]
            argv += ["--command-timeout", f"{int(self._timeout_s)}s", "copy", "--quiet"]
            if parsed.registry in self._insecure:
                argv.append("--src-tls-verify=false")
            argv += [parsed.skopeo_source(), f"oci:{layout}:{_COPY_TAG}"]
            self._run(reference, "skopeo copy", argv)
            digest, tag = _find_manifest(reference, layout, _COPY_TAG)
            rootfs = self._load(reference, digest)
            if rootfs is None:
                env = _image_env(reference, layout, digest)
                rootfs = self._unpack(reference, layout, tag, digest, env)
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        _write_json(ref_file, {"reference": reference, "digest": digest}, atomic=True)
        return rootfs

    # Cache

    def _image_dir(self, digest: str) -> Path:
        return self.cache_dir / "images" / digest.replace(":", "-")

    def _load(self, reference: str, digest: str) -> Rootfs | None:
        image_dir = self._image_dir(digest)
        try:
            meta = json.loads((image_dir / "image.json").read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ImageError(reference, f"cache entry {image_dir} is damaged: {exc}") from None
        return Rootfs(
            path=image_dir / "rootfs",
            reference=reference,
            digest=digest,
            env=tuple(meta.get("env", ())),
            cached=True,
        )

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        """A private directory under tmp/ on the cache's filesystem (so that publishing it
        is a rename); whatever is still in it at the end is removed."""
        tmp = self.cache_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=tmp))
        staging.chmod(0o755)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, reference: str, tree: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            tree.rename(final)
        except OSError as exc:
            # Lost a race with another resolution of the same image: theirs is as good.
            if not final.is_dir():
                raise ImageError(reference, f"cannot store {final} in the cache: {exc}") from None

    def _lock(self, reference: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(reference, threading.Lock())

    def _tool(self, reference: str, name: Literal["skopeo", "umoci"]) -> str:
        configured = self._skopeo if name == "skopeo" else self._umoci
        found = configured or shutil.which(name)
        if found is None:
            raise ImageError(reference, f"{name} is not installed (Debian package {name!r})")
        return found

    def _run(self, reference: str, what: str, argv: list[str]) -> None:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self._timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ImageError(reference, f"{what} took longer than {self._timeout_s:g}s") from None
        except OSError as exc:
            raise ImageError(reference, f"{what} could not run: {exc}") from None
        if proc.returncode != 0:
            detail = _last_lines(proc.stderr or proc.stdout)
            raise ImageError(reference, f"{what} failed: {_explain(detail)}")


def _find_manifest(reference: str, layout: Path, tag: str | None) -> tuple[str, str]:
    """The digest and tag of the image manifest `tag` names in an OCI layout."""
    if not layout.is_dir():
        raise ImageError(reference, f"no such OCI layout directory: {layout}")
    if not (layout / "oci-layout").is_file():
        raise ImageError(reference, f"{layout} is not an OCI image layout (no oci-layout file)")
    try:
        version = _read_json(reference, layout / "oci-layout", "oci-layout")["imageLayoutVersion"]
    except (KeyError, TypeError):
        raise ImageError(reference, f"{layout}/oci-layout names no imageLayoutVersion") from None
    if version != "1.0.0":
        raise ImageError(reference, f"unsupported OCI layout version {version!r}")
    index = _read_json(reference, layout / "index.json", "the layout's index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise ImageError(reference, "index.json lists no manifests")
    tagged = {
        d["annotations"][_REF_NAME]: d
        for d in manifests
        if isinstance(d, dict)
        and isinstance(d.get("annotations"), dict)
        and _REF_NAME in d["annotations"]
    }
    if tag is None:
        tag = "latest" if "latest" in tagged or len(tagged) != 1 else next(iter(tagged))
    descriptor = tagged.get(tag)
    if descriptor is None:
        known = ", ".join(sorted(tagged)) or "none"
        raise ImageError(reference, f"no image tagged {tag!r} in {layout} (tags: {known})")
    media_type = descriptor.get("mediaType")
    if media_type in _INDEXES:
        raise ImageError(
            reference,
            f"tag {tag!r} is a multi-platform index; copy one platform into a layout first "
            "(skopeo copy picks this host's)",
        )
    if media_type not in (_MANIFEST, _DOCKER_MANIFEST):
        raise ImageError(reference, f"tag {tag!r} is not an image manifest ({media_type})")
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(reference, f"tag {tag!r} has an unsupported digest {digest!r}")
    return digest, tag


def _image_env(reference: str, layout: Path, digest: str) -> tuple[str, ...]:
    manifest = _read_blob(reference, layout, digest, "manifest")
    try:
        config_digest = manifest["config"]["digest"]
    except (KeyError, TypeError):
        raise ImageError(reference, f"manifest {digest} names no config") from None
    config = _read_blob(reference, layout, config_digest, "config")
    env = (config.get("config") or {}).get("Env") or [] if isinstance(config, dict) else []
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise ImageError(reference, "the image config's Env is not a list of KEY=VALUE")
    return tuple(env)


def _read_blob(reference: str, layout: Path, digest: Any, what: str) -> Any:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(reference, f"unsupported {what} digest {digest!r}")
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(reference, f"the layout lacks the {what} blob {digest}") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(reference, f"the {what} blob {digest} does not match its digest")
    try:
        return json.loads(data)
    except ValueError:
        raise ImageError(reference, f"the {what} blob {digest} is not JSON") from None


def _read_json(reference: str, path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ImageError(reference, f"{what} is missing ({path})") from None
    except ValueError:
        raise ImageError(reference, f"{what} is not valid JSON ({path})") from None


def _read_ref(path: Path) -> str | None:
    try:
        digest = json.loads(path.read_bytes()).get("digest")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) and _DIGEST.fullmatch(digest) else None


def _ref_key(parsed: ImageReference) -> str:
    canonical = f"{parsed.location}:{parsed.tag or 'latest'}@{parsed.digest or ''}"
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _write_json(path: Path, data: Mapping[str, Any], *, atomic: bool = False) -> None:
    encoded = json.dumps(data, indent=1, sort_keys=True).encode()
    if not atomic:
        path.write_bytes(encoded)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encoded)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_etc(etc: Path) -> None:
    """The same /etc files as the namespace tier's sandboxes: the same users, by the same
    names, in every tier that runs the host's programs."""
    etc.mkdir(mode=0o755, exist_ok=True)
    for name, data in sandbox_etc():
        (etc / name).write_bytes(data)
        (etc / name).chmod(0o644)


def _last_lines(output: bytes, limit: int = 3) -> str:
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-limit:]) or "no output"


def _explain(detail: str) -> str:
    lowered = detail.lower()
    if "connection refused" in lowered or "no such host" in lowered or "i/o timeout" in lowered:
        return f"registry unreachable ({detail})"
    if "manifest unknown" in lowered or "name unknown" in lowered or "not found" in lowered:
        return f"no such image in the registry ({detail})"
    if "http response to https client" in lowered:
        return f"the registry speaks plain HTTP; list it in insecure_registries ({detail})"
    return detail
