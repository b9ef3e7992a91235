"""A node's functions' images, for every tier that runs them (`oci`, `gvisor`, `microvm`):
each reference checked against the registries the node pulls from, resolved (pulled and
unpacked, or found in the cache) once, and remembered for the node's life."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from treadle.shuttle.oci.images import ImageError, ImageStore, parse_reference
from treadle.shuttle.oci.rootfs import Rootfs

__all__ = ["ImageFetcher"]


class ImageFetcher:
    def __init__(
        self, store: ImageStore | None, allowed_registries: Collection[str] | None = None
    ) -> None:
        self._store = store
        self._allowed = None if allowed_registries is None else frozenset(allowed_registries)
        self._resolved: dict[str, Rootfs] = {}

    async def fetch(self, image: str) -> Rootfs:
        """The image's root filesystem, ready; ValueError naming the image and the cause
        where it cannot be had."""
        found = self._resolved.get(image)
        if found is not None:
            return found
        if self._store is None:
            raise ValueError("this node has no image store")
        if self._allowed is not None:
            try:
                registry = parse_reference(image).registry or "docker.io"
            except ImageError as exc:
                raise ValueError(str(exc)) from None
            if registry not in self._allowed:
                raise ValueError(
                    f"image {image}: registry {registry} is not one this node pulls from"
                )
        try:
            rootfs = await asyncio.to_thread(self._store.resolve, image)
        except ImageError as exc:
            raise ValueError(str(exc)) from None
        self._resolved[image] = rootfs
        return rootfs

    def fetched(self, image: str) -> Rootfs:
        """The root filesystem `fetch` made ready; ValueError where it did not."""
        found = self._resolved.get(image)
        if found is None:
            raise ValueError(f"image {image} was not fetched")
        return found
