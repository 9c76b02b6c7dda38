"""A registry version laid out as TF Serving loads it: `DEST/<version>/saved_model.pb`, `variables/`, `assets/`.

    resnet-pipeline registry pull resnet-digits@champion models/resnet-digits --layout tf-serving
    tensorflow_model_server --rest_api_port=8501 --model_name=resnet-digits --model_base_path=$PWD/models/resnet-digits

`DEST` is TF Serving's `--model_base_path`: one numbered folder per version, the highest served. The version
is pulled with `Registry.pull` (every file's sha256 checked) into a hidden folder beside `DEST`, and its
`saved_model/` is renamed to `DEST/<version>/` in one step, so a server polling `DEST` never sees half a
version, and a failed pull leaves `DEST` as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from resnet_pipeline.registry.core import MANIFEST, Registry
from resnet_pipeline.registry.spec import Spec
from resnet_pipeline.registry.storage import RegistryError

log = logging.getLogger(__name__)

SAVED_MODEL = "saved_model"
# Beside the SavedModel, where TF Serving looks for extras and ignores what it does not know.
EXTRA = "assets.extra"


def pull_for_serving(registry: Registry, spec: str | Spec, dest: str | Path) -> Path:
    """Pull the version `spec` names into `dest/<version>/` as a TF Serving model base path; return that folder.

    `dest` may hold other versions; `dest/<version>` must not exist or be empty. The version's manifest
    and labels go to `dest/<version>/assets.extra/`.
    """
    name, version = registry.resolve(spec)
    dest = Path(dest)
    target = dest / str(version)
    if dest.exists() and not dest.is_dir():
        raise RegistryError(f"{dest}: exists and is not a folder; expected a TF Serving model base path")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RegistryError(f"{target}: version {version} of {name} is already there; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.{version}."))
    try:
        pulled = registry.pull(Spec(name, version=version), staging / "version")
        saved_model = pulled / SAVED_MODEL
        if not (saved_model / "saved_model.pb").is_file():
            raise RegistryError(
                f"model {name}:{version} has no {SAVED_MODEL}/saved_model.pb (registered without "
                f"a SavedModel); TF Serving cannot load it"
            )
        extra = saved_model / EXTRA
        extra.mkdir(exist_ok=True)
        for file in (MANIFEST, "labels.json"):
            if (pulled / file).is_file():
                os.replace(pulled / file, extra / file)
        _fsync_tree(saved_model)
        dest.mkdir(exist_ok=True)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.rename(saved_model, target)
        _fsync_dir(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("registry: pulled %s:%d for TF Serving to %s", name, version, target)
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, so the rename publishes complete files."""
    for folder, _, files in os.walk(root):
        for file in files:
            fd = os.open(os.path.join(folder, file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))
