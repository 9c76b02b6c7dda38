"""The registry's uses by the pipeline: the register stage (with the gate), the champion's figures
for evaluation, and fetching a version for prediction."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import yaml

from resnet_pipeline.fileio import atomic_write_json, read_json, sha256_file
from resnet_pipeline.registry.core import MANIFEST, Registry
from resnet_pipeline.registry.gate import decide
from resnet_pipeline.registry.spec import Spec, parse_spec
from resnet_pipeline.registry.storage import RegistryError

log = logging.getLogger(__name__)


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return None


def git_commit(root: str | Path = ".") -> str | None:
    """`git rev-parse HEAD` in `root`, or None outside a repository or without git."""
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def environment() -> dict:
    return {"python": platform.python_version(), "tensorflow": _package_version("tensorflow", "tensorflow-cpu"),
            "keras": _package_version("keras"), "resnet_pipeline": _package_version("resnet-pipeline")}


def data_version(data_manifest: str | Path | None, dvc_lock: str | Path | None) -> dict:
    """sha256 of the manifest parquet (it identifies the test split) and of dvc.lock, None when absent."""
    def digest(path):
        return sha256_file(path) if path is not None and Path(path).is_file() else None
    return {"manifest_sha256": digest(data_manifest), "dvc_lock_sha256": digest(dvc_lock)}


def _open(registry) -> Registry:
    if isinstance(registry, Registry):
        return registry
    from resnet_pipeline.registry import open_registry

    return open_registry(registry)


def register_model(registry: Registry | str | Path, name: str, model_dir: str | Path, eval_dir: str | Path,
                   out: str | Path, *, alias: str = "champion", gate_metric: str = "top1",
                   min_improvement: float = 0.0, data_manifest: str | Path | None = None,
                   dvc_lock: str | Path | None = None, root: str | Path = ".", provenance: dict | None = None) -> dict:
    """Register stage: add the trained model and its evaluation as a new version, decide with the gate
    whether it becomes `name@alias`, swap the alias if so, and write the record to `out`.

    `provenance` (from `resnet_pipeline.provenance.assemble`) replaces config.yaml as the version's
    params.yaml and the data record with the stages' own records."""
    reg = _open(registry)
    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    files = {"model.keras": model_dir / "model.keras", "params.yaml": model_dir / "config.yaml",
             "labels.json": model_dir / "labels.json", "metrics.json": eval_dir / "metrics.json"}
    if (model_dir / "saved_model").is_dir():
        files["saved_model"] = model_dir / "saved_model"
    for target, source in files.items():
        if not source.exists():
            raise RegistryError(f"{source}: file to register as {target} of model {name!r} not found")
    metrics = read_json(files["metrics.json"], "evaluation metrics")
    data = data_version(data_manifest, dvc_lock)
    if provenance is not None:
        from resnet_pipeline.provenance import params_yaml

        files["params.yaml"] = Path(tempfile.mkdtemp(prefix="params-")) / "params.yaml"
        files["params.yaml"].write_text(params_yaml(provenance))
        data = provenance["data"]
    champion = reg.alias(name, alias)
    champion_manifest = reg.manifest(Spec(name, version=champion.version)) if champion.record else None
    decision = decide(metrics, data["manifest_sha256"], champion_manifest, alias=alias, metric=gate_metric,
                      min_improvement=min_improvement)
    meta = {"params": yaml.safe_load(files["params.yaml"].read_text()), "metrics": metrics, "data": data,
            "git_commit": git_commit(root), "environment": environment(),
            "labels": read_json(files["labels.json"], "labels").get("classes"), "gate": decision}
    if provenance is not None:
        meta["stages"] = provenance["stages"]
    try:
        version = reg.register(name, files, meta)
    finally:
        if provenance is not None:
            shutil.rmtree(files["params.yaml"].parent, ignore_errors=True)
    promotion = {"alias": alias, "promoted": False, "error": None}
    if decision["promote"]:
        try:
            reg.promote(name, version, alias, expected=champion, reason=decision["reason"])
            promotion["promoted"] = True
        except RegistryError as err:  # lost a race with another promotion: the version stays registered
            promotion["error"] = str(err)
    record = {"name": name, "version": version, "registry": reg.location, "metrics": metrics, "gate": decision,
              "promotion": promotion}
    atomic_write_json(out, record)
    return record


def champion_summary(registry: Registry | str | Path, name: str, alias: str = "champion") -> dict | None:
    """`{"version", "test", "data": {"manifest_sha256"}}` of `name@alias`; None if there is none (or no
    registry yet)."""
    reg = _open(registry)  # a local folder that does not exist yet has no alias either
    state = reg.alias(name, alias)
    if state.record is None:
        return None
    manifest = reg.manifest(Spec(name, version=state.version))
    return {"version": state.version, "test": (manifest.get("metrics") or {}).get("test") or {},
            "data": {"manifest_sha256": (manifest.get("data") or {}).get("manifest_sha256")}}


def _complete(folder: Path, manifest: dict) -> bool:
    """Does `folder` hold exactly this manifest and every file with its sha256?"""
    try:
        if json.loads((folder / MANIFEST).read_text()) != manifest:
            return False
        return all((folder / t).is_file() and (folder / t).stat().st_size == e["bytes"]
                   and sha256_file(folder / t) == e["sha256"] for t, e in manifest["files"].items())
    except (OSError, ValueError):
        return False


def fetch_model(spec: str, registry: Registry | str | Path, cache_dir: str | Path) -> Path:
    """The folder of a version in `cache_dir/<name>/<version>/`, pulled (verified) the first time and
    reused after checking it is complete. An alias is resolved now, at every call."""
    reg = _open(registry)
    name, version = reg.resolve(parse_spec(spec))
    manifest = reg.manifest(Spec(name, version=version))
    target = Path(cache_dir) / name / str(version)
    if _complete(target, manifest):
        return target
    if target.exists():
        log.warning("registry cache: %s is incomplete or altered; pulling %s:%d again", target, name, version)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}."))
    try:
        reg.download_version(name, version, manifest, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process fetched it meanwhile
            if not _complete(target, manifest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
