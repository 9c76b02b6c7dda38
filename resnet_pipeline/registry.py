"""A versioned model registry in a local folder, with the layout of design.md.

    models/<name>/versions/<N>/{model.keras, params.yaml, metrics.json, labels.json, manifest.json}

A version number is claimed by creating its folder (`mkdir` fails if another writer took it), the
files are copied in, and `manifest.json`, listing the sha256 of every other file, is renamed into
place last: it is the commit point, and a version without it does not exist. `pull` verifies every
checksum and refuses a mismatch, leaving the destination untouched.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from resnet_pipeline.fileio import atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
SPEC_RE = re.compile(r"^(?P<name>[^:@]+)(?::(?P<version>\d+))?$")


class RegistryError(RuntimeError):
    """A registry operation could not be done; the message names the model, version or file."""


class LocalRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _versions_dir(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise RegistryError(f"model name {name!r}: expected lowercase letters, digits, '.', '_' or '-'")
        return self.root / "models" / name / "versions"

    def versions(self, name: str) -> list[int]:
        """Committed versions of `name` (those with a manifest), ascending."""
        folder = self._versions_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    def names(self) -> list[str]:
        models = self.root / "models"
        return sorted(p.name for p in models.iterdir() if p.is_dir() and self.versions(p.name)) if models.is_dir() else []

    def _claim(self, name: str) -> tuple[int, Path]:
        folder = self._versions_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        number = max(taken, default=0) + 1
        while True:
            try:
                (folder / str(number)).mkdir()  # atomic: exactly one writer creates it
                return number, folder / str(number)
            except FileExistsError:
                number += 1

    def register(self, name: str, files: dict[str, Path], metadata: dict) -> int:
        """Copy `files` (name in the version -> source path) as a new version; return its number."""
        for target, source in files.items():
            if not Path(source).is_file():
                raise RegistryError(f"{source}: file to register as {target} not found")
        version, folder = self._claim(name)
        entries = {}
        for target, source in sorted(files.items()):
            shutil.copyfile(source, folder / target)
            entries[target] = {"sha256": sha256_file(folder / target), "bytes": (folder / target).stat().st_size}
        manifest = {
            "name": name,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "files": entries,
            **metadata,
        }
        atomic_write_json(folder / MANIFEST, manifest)  # the commit point
        log.info("registry: registered %s:%d in %s", name, version, self.root)
        return version

    def resolve(self, spec: str) -> tuple[str, int]:
        """`NAME` (latest) or `NAME:VERSION` -> (name, version) of a committed version."""
        m = SPEC_RE.match(spec)
        if not m:
            raise RegistryError(f"model {spec!r}: expected NAME or NAME:VERSION, such as resnet-digits:3")
        name = m["name"]
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"model {name!r}: no registered version in {self.root}")
        if m["version"] is None:
            return name, versions[-1]
        version = int(m["version"])
        if version not in versions:
            raise RegistryError(f"model {name}:{version}: no such version in {self.root}; versions: {versions}")
        return name, version

    def manifest(self, spec: str) -> dict:
        name, version = self.resolve(spec)
        return read_json(self._versions_dir(name) / str(version) / MANIFEST, "version manifest")

    def pull(self, spec: str, dest: str | Path) -> Path:
        """Copy a version to `dest` (absent or empty), verifying every file's sha256."""
        name, version = self.resolve(spec)
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"{dest}: destination exists and is not an empty folder; refusing to overwrite it")
        source = self._versions_dir(name) / str(version)
        manifest = read_json(source / MANIFEST, "version manifest")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            for target, entry in sorted(manifest["files"].items()):
                src = source / target
                if not src.is_file():
                    raise RegistryError(f"{name}:{version}: file {target} listed in the manifest is missing at {src}")
                shutil.copyfile(src, tmp / target)
                actual = sha256_file(tmp / target)
                if actual != entry["sha256"]:
                    raise RegistryError(
                        f"{name}:{version}: file {target} fails verification: sha256 {actual}, "
                        f"manifest says {entry['sha256']}; refusing it"
                    )
            shutil.copyfile(source / MANIFEST, tmp / MANIFEST)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("registry: pulled %s:%d to %s", name, version, dest)
        return dest


def register_model(registry: str | Path, name: str, model_dir: str | Path, eval_dir: str | Path, out: str | Path) -> dict:
    """Register stage: add the trained model and its evaluation as a new version; write `out`."""
    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    metrics = read_json(eval_dir / "metrics.json", "evaluation metrics")
    files = {
        "model.keras": model_dir / "model.keras",
        "params.yaml": model_dir / "config.yaml",
        "labels.json": model_dir / "labels.json",
        "metrics.json": eval_dir / "metrics.json",
    }
    reg = LocalRegistry(registry)
    version = reg.register(name, files, {"metrics": metrics})
    record = {"name": name, "version": version, "registry": str(registry), "metrics": metrics}
    atomic_write_json(out, record)
    return record
