"""A versioned model registry on S3 or in a local folder, with the layout of design.md.

    reg = open_registry("s3://bucket/prefix")      # or a folder: open_registry("registry")
    version = reg.register("resnet-digits", {"model.keras": path, ...}, metadata)
    reg.promote("resnet-digits", version, "champion")
    reg.pull("resnet-digits@champion", "dest")     # verifies every sha256
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_pipeline.registry.core import CLAIM, MANIFEST, AliasState, Registry
from resnet_pipeline.registry.gate import decide
from resnet_pipeline.registry.spec import Spec, parse_spec
from resnet_pipeline.registry.stage import champion_summary, fetch_model, register_model
from resnet_pipeline.registry.storage import Conflict, LocalStorage, RegistryError

__all__ = ["CLAIM", "MANIFEST", "AliasState", "Conflict", "LocalRegistry", "Registry", "RegistryError", "Spec",
           "champion_summary", "decide", "fetch_model", "open_registry", "parse_spec", "register_model"]


class LocalRegistry(Registry):
    """A registry in a local folder."""

    def __init__(self, root: str | Path):
        super().__init__(LocalStorage(root))
        self.root = Path(root)


def open_registry(location: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None,
                  addressing_style: str = "auto", root: str | Path | None = None, max_attempts: int = 5,
                  access_key: str | None = None, secret_key: str | None = None) -> Registry:
    """`s3://bucket/prefix` (boto3's credential chain unless keys are given; endpoint and region from the
    arguments or the environment) or a local folder (relative to `root` if given)."""
    location = str(location)
    if location.startswith("s3://"):
        from resnet_pipeline.registry.s3 import S3Storage

        return Registry(S3Storage(location, endpoint_url=endpoint_url, region=region, addressing_style=addressing_style,
                                  max_attempts=max_attempts, access_key=access_key, secret_key=secret_key))
    if "://" in location:
        raise RegistryError(f"registry {location!r}: expected s3://BUCKET[/PREFIX] or a local folder")
    path = Path(location)
    return LocalRegistry(Path(root) / path if root is not None and not path.is_absolute() else path)
