"""A versioned model registry on S3 or in a local folder (layout: the README's "The model registry").

reg = open_registry("s3://bucket/prefix")      # or a folder: open_registry("registry")
version = reg.register("resnet-digits", {"model.keras": path, ...}, metadata)
reg.promote("resnet-digits", version, "champion")
reg.pull("resnet-digits@champion", "dest")     # verifies every sha256
"""

from __future__ import annotations

from resnet_pipeline.registry.aliases import AliasState
from resnet_pipeline.registry.core import GC_AGE, Registry
from resnet_pipeline.registry.gate import decide
from resnet_pipeline.registry.manifest import CLAIM, HEARTBEAT, MANIFEST
from resnet_pipeline.registry.opening import LocalRegistry, open_registry
from resnet_pipeline.registry.spec import Spec, parse_spec
from resnet_pipeline.registry.stage import fetch_model, register_model
from resnet_pipeline.registry.storage import Conflict, RegistryError

__all__ = [
    "CLAIM",
    "GC_AGE",
    "HEARTBEAT",
    "MANIFEST",
    "AliasState",
    "Conflict",
    "LocalRegistry",
    "Registry",
    "RegistryError",
    "Spec",
    "decide",
    "fetch_model",
    "open_registry",
    "parse_spec",
    "register_model",
]
