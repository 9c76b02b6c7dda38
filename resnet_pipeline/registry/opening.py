"""Opening a registry by location: `s3://bucket/prefix` or a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from resnet_pipeline.redact import redact_url
from resnet_pipeline.registry.core import Registry
from resnet_pipeline.registry.storage import LocalStorage, RegistryError


class LocalRegistry(Registry):
    """A registry in a local folder."""

    def __init__(self, root: str | Path, **options):
        super().__init__(LocalStorage(root), **options)
        self.root = Path(root)


def open_registry(
    location: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    addressing_style: str = "auto",
    root: str | Path | None = None,
    max_attempts: int = 5,
    access_key: str | None = None,
    secret_key: str | None = None,
    allow_unsafe_store: bool = False,
) -> Registry:
    """`s3://bucket/prefix` (boto3's credential chain unless keys are given; endpoint and region from the
    arguments or the environment) or a local folder (relative to `root` if given). Writes first check
    that the store honours conditional writes, unless `allow_unsafe_store`."""
    location = str(location)
    if location.startswith("s3://"):
        from resnet_pipeline.registry.s3 import S3Storage

        storage = S3Storage(
            location,
            endpoint_url=endpoint_url,
            region=region,
            addressing_style=addressing_style,
            max_attempts=max_attempts,
            access_key=access_key,
            secret_key=secret_key,
        )
        return Registry(storage, allow_unsafe_store=allow_unsafe_store)
    if "://" in location:
        raise RegistryError(f"registry {redact_url(location)!r}: expected s3://BUCKET[/PREFIX] or a local folder")
    path = Path(location)
    return LocalRegistry(
        Path(root) / path if root is not None and not path.is_absolute() else path,
        allow_unsafe_store=allow_unsafe_store,
    )


def version_location(location: str, name: str, version: int) -> str:
    """The folder of version `version` of `name` in the registry at `location`: an s3:// URL, or a
    file:// URI of a local folder."""
    if location.startswith("s3://"):
        return f"{location.rstrip('/')}/models/{name}/versions/{version}/"
    return Path(location, "models", name, "versions", str(version)).resolve().as_uri() + "/"
