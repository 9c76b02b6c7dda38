"""The tests' S3 server: SeaweedFS on loopback, from the dev tooling in `infra/devs3.py` (outside the package)."""

from __future__ import annotations

import importlib.util
import sys

from tests.project import REPO

_NAME = "devs3"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, REPO / "infra" / "devs3.py")
    assert _spec is not None and _spec.loader is not None
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
_devs3 = sys.modules[_NAME]

PORT_FLAGS = _devs3.PORT_FLAGS
SeaweedS3 = _devs3.SeaweedS3
SeaweedS3Error = _devs3.SeaweedS3Error
find_weed = _devs3.find_weed

__all__ = ["PORT_FLAGS", "SeaweedS3", "SeaweedS3Error", "find_weed"]
