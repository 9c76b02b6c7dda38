"""The registry's uses by the pipeline: the register stage (with the gate) and fetching a version
for prediction."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path

import yaml

from resnet_pipeline.fileio import atomic_write_json, current_umask, read_json, sha256_file
from resnet_pipeline.redact import redact_url, redact_values
from resnet_pipeline.registry.core import Registry
from resnet_pipeline.registry.gate import PREDICTIONS, decide, read_predictions
from resnet_pipeline.registry.opening import open_registry
from resnet_pipeline.registry.pull import complete
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
    return {
        "python": platform.python_version(),
        "tensorflow": _package_version("tensorflow", "tensorflow-cpu"),
        "keras": _package_version("keras"),
        "resnet_pipeline": _package_version("resnet-pipeline"),
    }


def data_version(data_manifest: str | Path | None, dvc_lock: str | Path | None) -> dict:
    """sha256 of the manifest parquet (it identifies the test split) and of dvc.lock, None when absent."""

    def digest(path):
        return sha256_file(path) if path is not None and Path(path).is_file() else None

    return {"manifest_sha256": digest(data_manifest), "dvc_lock_sha256": digest(dvc_lock)}


def _open(registry) -> Registry:
    if isinstance(registry, Registry):
        return registry
    return open_registry(registry)


def register_model(
    registry: Registry | str | Path,
    name: str,
    model_dir: str | Path,
    eval_dir: str | Path,
    out: str | Path,
    *,
    alias: str = "champion",
    gate_metric: str = "top1",
    min_improvement: float = 0.0,
    data_manifest: str | Path | None = None,
    dvc_lock: str | Path | None = None,
    root: str | Path = ".",
    gate_options: dict | None = None,
    provenance: dict | None = None,
    dvc: dict | None = None,
    exports: Callable[[Path], dict[str, Path]] | None = None,
    exports_context: dict | None = None,
) -> dict:
    """Register stage: add the trained model and its evaluation as a new version, decide with the gate
    whether it becomes `name@alias`, swap the alias if so, and write the record to `out`.

    `gate_options` are the gate's other settings (`rule`, `min_value`, `max_class_drop`,
    `bootstrap_samples`, `bootstrap_seed`; see gate.decide). `provenance` (from
    `resnet_pipeline.provenance.assemble`) replaces the train stage's params.yaml as the version's and the
    data record with the stages' own records. `dvc_lock`, when it exists, is registered as the version's
    `dvc.lock` (with `dvc`, what was pushed where, in its manifest): what `registry restore` reads.
    `exports(folder)` makes files to add to the version (name -> file, written into `folder`), called only
    when a version is about to be written; the token hashes `exports_context` (what they are made with)
    instead of their bytes, which a conversion need not repeat byte for byte."""
    reg = _open(registry)
    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    files = {
        "model.keras": model_dir / "model.keras",
        "params.yaml": model_dir / "params.yaml",
        "labels.json": model_dir / "labels.json",
        "metrics.json": eval_dir / "metrics.json",
    }
    if (model_dir / "saved_model").is_dir():
        files["saved_model"] = model_dir / "saved_model"
    if (eval_dir / PREDICTIONS).is_file():
        files[PREDICTIONS] = eval_dir / PREDICTIONS
    if dvc_lock is not None and Path(dvc_lock).is_file():
        files["dvc.lock"] = Path(dvc_lock)
    for target, source in files.items():
        if not source.exists():
            raise RegistryError(f"{source}: file to register as {target} of model {name!r} not found")
    metrics = read_json(files["metrics.json"], "evaluation metrics")
    data = data_version(data_manifest, dvc_lock)
    params = redact_values(yaml.safe_load(files["params.yaml"].read_text()))
    scratch = exported = None
    if provenance is not None:  # each stage's own record (resnet_pipeline.provenance)
        from resnet_pipeline.provenance import params_yaml

        params, data = redact_values(provenance["params"]), provenance["data"]
        scratch = Path(tempfile.mkdtemp(prefix="params-"))
        files["params.yaml"] = scratch / "params.yaml"
        files["params.yaml"].write_text(params_yaml(params))
    try:
        options = dict(gate_options or {})
        gate_settings = {"alias": alias, "metric": gate_metric, "min_improvement": min_improvement, **options}
        context = {"params": params, "data": data, "gate": gate_settings}
        if exports is not None:
            context["exports"] = exports_context or {}
        token = reg.registration_token(name, files, context)
        done = reg.find_registration(name, token)
        champion = reg.alias(name, alias)
        if done is not None and done[1]:  # a retry of a registration that committed: same version, same decision
            version, decision = done[0], reg.manifest(Spec(name, version=done[0])).get("gate") or {}
            log.info("register: %s:%d already holds this registration; reusing it and its gate decision", name, version)
        else:
            champion_manifest = reg.manifest(Spec(name, version=champion.version)) if champion.record else None
            classes = read_json(files["labels.json"], "labels").get("classes")
            predictions = _paired_predictions(reg, name, champion.version, champion_manifest, files, options)
            decision = decide(
                metrics,
                data["manifest_sha256"],
                champion_manifest,
                alias=alias,
                metric=gate_metric,
                min_improvement=min_improvement,
                predictions=predictions,
                classes=classes,
                **options,
            )
            meta = {
                "params": params,
                "metrics": metrics,
                "data": data,
                "git_commit": git_commit(root),
                "environment": environment(),
                "labels": read_json(files["labels.json"], "labels").get("classes"),
                "gate": decision,
                "init": _init_record(model_dir),
            }
            if provenance is not None:
                meta["stages"] = redact_values(provenance["stages"])
            if dvc is not None:
                meta["dvc"] = redact_values(dvc)
            if exports is not None:  # e.g. ONNX and LiteRT files, each checked against the model
                exported = Path(tempfile.mkdtemp(prefix="exports-"))
                files = {**files, **exports(exported)}
            version = reg.register(name, files, meta, token=token)
    finally:
        for folder in (scratch, exported):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    promotion = {"alias": alias, "promoted": False, "error": None}
    if champion.version == version:
        promotion["promoted"] = True  # the first attempt promoted it before it was cut short
    elif decision.get("promote"):
        try:
            reg.promote(name, version, alias, expected=champion, reason=decision["reason"])
            promotion["promoted"] = True
        except RegistryError as err:  # lost a race with another promotion: the version stays registered
            promotion["error"] = str(err)
    record = {
        "name": name,
        "version": version,
        "registry": redact_url(reg.location),
        "metrics": metrics,
        "gate": decision,
        "promotion": promotion,
    }
    atomic_write_json(out, record)
    return record


def _paired_predictions(
    reg: Registry, name: str, version: int | None, champion_manifest: dict | None, files: dict, options: dict
) -> tuple[dict, dict] | None:
    """(candidate's, champion's) per-image predictions for the paired gate; None when either is missing."""
    if options.get("rule") != "paired_bootstrap" or champion_manifest is None or PREDICTIONS not in files:
        return None
    if PREDICTIONS not in champion_manifest.get("files", {}):
        return None
    with tempfile.TemporaryDirectory(prefix="resnet-gate-") as tmp:
        theirs = reg.fetch_file(Spec(name, version=version), PREDICTIONS, Path(tmp) / PREDICTIONS)
        return read_predictions(files[PREDICTIONS]), read_predictions(theirs)


def _init_record(model_dir: Path) -> dict | None:
    """The model's starting weights (`init.json` of the train stage: source, sha256, layers loaded)."""
    return read_json(model_dir / "init.json", "init record") if (model_dir / "init.json").is_file() else None


def _cache_folder(cache_dir: Path, name: str) -> Path:
    """`cache_dir/name`, made if needed, refused if it (or the cache) is a symlink or not a folder: a
    shared cache is a place where someone else could have planted a link."""
    folder = cache_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for path in (cache_dir, folder):
        if path.is_symlink() or not path.is_dir():
            raise RegistryError(
                f"{path}: the model cache folder is a symlink or not a folder; refusing to "
                "write through it (remove it, or set RESNET_PIPELINE_CACHE)"
            )
    return folder


def fetch_model(spec: str, registry: Registry | str | Path, cache_dir: str | Path) -> Path:
    """The folder of a version in `cache_dir/<name>/<version>/`, pulled (verified) the first time and
    reused after checking it is complete. An alias is resolved now, at every call."""
    reg = _open(registry)
    name, version = reg.resolve(parse_spec(spec))
    manifest, raw = reg.manifest_bytes(Spec(name, version=version))  # refused here if any name is unsafe
    parent = _cache_folder(Path(cache_dir), name)
    target = parent / str(version)
    if complete(target, manifest, raw, sha256_file):
        return target
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        log.warning("registry cache: %s is incomplete or altered; pulling %s:%d again", target, name, version)
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{version}."))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the cache is as readable as any folder
        reg.download_version(name, version, manifest, tmp, raw)
        try:
            tmp.rename(target)
        except OSError:  # another process fetched it meanwhile
            if not complete(target, manifest, raw, sha256_file):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
