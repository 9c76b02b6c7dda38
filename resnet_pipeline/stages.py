"""The one API that runs a stage from a typed config and the paths of `resnet_pipeline.paths.Paths`.

    from resnet_pipeline import config, stages
    from resnet_pipeline.paths import Paths

    cfg = config.load("params.yaml", {"train.epochs": 3})
    paths = Paths.from_config(cfg)
    with stages.stage_lock("split", paths):
        stages.run_stage("split", cfg, paths)

The CLI (and so `dvc repro`) and the Prefect flow call these functions. Each stage checks that the
outputs it reads carry the keys of the current params (`stagekeys`) and records its own. The
TensorFlow-heavy modules are imported inside the stages that need them (train, evaluate, register),
so that running download, split or shard never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.paths import Paths
from resnet_pipeline.runlock import folder_lock  # noqa: F401 - the flow's lock for a whole run
from resnet_pipeline.stagekeys import DATA_STAGES, is_current, record_key, require_current, stage_key  # noqa: F401
from resnet_pipeline.training.preempt import Preempted  # noqa: F401 - what train raises after SIGTERM


def run_download(cfg: Config, paths: Paths) -> str:
    """Fetch and extract the dataset into `paths.raw`; the extracted folder."""
    from resnet_pipeline.data.download import download

    dest = download(cfg.download, paths.raw, paths.downloads)
    record_key("download", cfg, paths)
    return str(dest)


def run_split(cfg: Config, paths: Paths) -> dict:
    """Write the manifest and labels.json; `{"images": rows}`."""
    from resnet_pipeline.data.split import split

    require_current(("download",), cfg, paths)
    table = split(cfg.split, cfg.base.seed, paths.raw / cfg.download.dataset, paths.manifest, paths.labels)
    record_key("split", cfg, paths)
    return {"images": table.num_rows}


def run_shard(cfg: Config, paths: Paths) -> dict:
    """Write the TFRecord shards and their index; the records per split."""
    from resnet_pipeline.data.shard import shard

    require_current(("download", "split"), cfg, paths)
    splits = shard(cfg.shard, paths.manifest, paths.raw, paths.shards)["splits"]
    record_key("shard", cfg, paths)
    return splits


def run_train(cfg: Config, paths: Paths) -> dict:
    """Train into `paths.model_dir`; steps, wall time and images/s. Raises `Preempted` (after a
    checkpoint) when SIGTERM arrives."""
    require_current(("split", "shard"), cfg, paths)
    from resnet_pipeline.training.strategy import make_strategy

    # before anything else touches TensorFlow: MultiWorkerMirroredStrategy and logical CPUs need it
    strategy, cluster = make_strategy(cfg.train.strategy, cfg.train.cpu_devices)
    from resnet_pipeline.training.loop import train

    registry = config_mod.init_kind(cfg.train.init) == "registry"
    summary = train(
        cfg.train,
        cfg,
        paths.shards,
        paths.labels,
        paths.model_dir,
        paths.checkpoints,
        tensorboard_root=paths.tensorboard,
        strategy=strategy,
        cluster=cluster,
        fetch_init=init_fetcher(open_registry(cfg, paths.root)) if registry else None,
    )
    return {k: summary[k] for k in ("steps", "wall_time_sec", "images_per_sec")}


def run_evaluate(cfg: Config, paths: Paths) -> dict:
    """Evaluate the trained model on the test split into `paths.eval_dir`; the test figures."""
    from resnet_pipeline.evaluation import evaluate
    from resnet_pipeline.fileio import sha256_file

    require_current(("split", "shard"), cfg, paths)
    manifest_sha256 = sha256_file(paths.manifest) if paths.manifest.is_file() else None
    return evaluate(cfg.evaluate, paths.model_dir, paths.shards, paths.eval_dir, manifest_sha256=manifest_sha256)[
        "test"
    ]


def run_register(cfg: Config, paths: Paths) -> str:
    """Register the model and its evaluation, then the gate; two lines saying what happened (the
    record, with the gate's decision, is `paths.registered`)."""
    from resnet_pipeline.provenance import assemble
    from resnet_pipeline.registry import register_model
    from resnet_pipeline.registry.gate import describe

    r = cfg.register
    provenance = assemble(cfg, paths)
    exports = register_exports(cfg, paths)
    published = publish_to_dvc(cfg, paths)  # pushed first: no version points at bytes nobody has
    try:
        record = register_model(
            open_registry(cfg, paths.root),
            r.model_name,
            paths.model_dir,
            paths.eval_dir,
            paths.registered,
            alias=r.alias,
            gate_metric=r.gate_metric,
            min_improvement=r.min_improvement,
            data_manifest=paths.manifest,
            dvc_lock=published["lock"] if published else None,
            dvc={k: v for k, v in published.items() if k != "lock"} if published else None,
            root=paths.root,
            provenance=provenance,
            **exports,
            gate_options={
                "rule": r.gate,
                "min_value": r.min_value,
                "max_class_drop": r.max_class_drop,
                "bootstrap_samples": r.bootstrap_samples,
                "bootstrap_seed": r.bootstrap_seed,
            },
        )
    finally:
        if published is not None:
            shutil.rmtree(published["lock"].parent, ignore_errors=True)
    lines = [
        f"registered {record['name']}:{record['version']} in {record['registry']}",
        f"gate: {describe(record['gate'])}",
    ]
    if record["promotion"]["error"]:
        lines.append(f"promotion failed: {record['promotion']['error']}")
    if exports:  # none on a retry that found its version committed: the version holds them
        from resnet_pipeline.exports.make import summary

        lines += [f"export {summary(made)}" for made in exports["exports"].records.values()]
    return "\n".join(lines)


def register_exports(cfg: Config, paths: Paths) -> dict[str, Any]:
    """`register_model`'s `exports` and `exports_context` for `register.export_formats` (none: {})."""
    formats = cfg.register.export_formats
    if not formats:
        return {}
    from resnet_pipeline.exports.formats import ExportSettings
    from resnet_pipeline.exports.make import RegistrationExports

    settings = ExportSettings.from_config(cfg)
    return {
        "exports": RegistrationExports(formats, paths.model_dir, paths.shards, settings),
        "exports_context": {"formats": list(formats), **settings.to_dict()},
    }


def dvc_root(paths: Paths) -> Path | None:
    """The DVC project that records the stages run on `paths` (`paths.root`), or None, logged, when
    it is not one: the stages run the same, without dvc.lock and push (`dvcrecord`)."""
    from resnet_pipeline.dvcrecord import project_root

    return project_root(paths)


def record_in_dvc(name: str, cfg: Config, root: Path) -> None:
    """Record stage `name`, just run with `cfg`, in dvc.lock of the DVC project `root`, as `dvc repro`
    does after running it (the flow does this after each stage)."""
    from resnet_pipeline.dvcrecord import record_stage

    record_stage(root, name, cfg)


def stale_in_dvc(name: str, root: Path | None) -> bool:
    """Whether dvc.lock of the DVC project `root` records stage `name` and DVC sees its files changed
    (an upstream output changed without its inputs: only DVC sees it, the stage keys do not)."""
    if root is None:
        return False
    from resnet_pipeline.dvcrecord import stale_in_lock

    return stale_in_lock(root, name) is not None


def current_in_dvc(name: str, cfg: Config, root: Path | None) -> bool:
    """Whether dvc.lock of the DVC project `root` records stage `name` as it would be run with `cfg`
    (deps, params and outputs unchanged): `dvc repro` would skip it, and so does the flow."""
    if root is None:
        return False
    from resnet_pipeline.dvcrecord import current_in_lock

    return current_in_lock(root, name, cfg)


def publish_to_dvc(cfg: Config, paths: Paths) -> dict | None:
    """Before registering: dvc.lock checked against the workspace and the outputs pushed to the DVC
    remote; what the version records about it (`lock`: a copy of dvc.lock in a temporary folder of
    its own, for the caller to remove), or None outside a DVC project."""
    from resnet_pipeline.dvcrecord import project_root, publish

    root = project_root(paths)
    return None if root is None else publish(root, cfg)


# --------------------------------------------------------------------------- the shard stage, spread
# The flow writes each shard as a task of its own (a Dask or Ray runner spreads them over machines):
# `begin_shard`, then `write_shard` per plan, then `end_shard`; together they are `run_shard`.


def begin_shard(cfg: Config, paths: Paths) -> tuple[list[dict], Path]:
    """Check the inputs' keys; the shards to write (`{"file", "split", "rows"}` each) and the staging
    folder beside `paths.shards` they are written into."""
    from resnet_pipeline.data import shard as shard_mod
    from resnet_pipeline.fileio import new_staging_dir

    require_current(("download", "split"), cfg, paths)
    plans = shard_mod.plan_shards(cfg.shard, paths.manifest)
    return plans, new_staging_dir(paths.shards)


def write_shard(plan: dict, cfg: Config, paths: Paths, staging: Path) -> dict:
    """Write one planned shard into `staging`; its index entry."""
    from resnet_pipeline.data import shard as shard_mod

    return shard_mod.write_shard(plan, paths.raw, staging, cfg.shard)


def end_shard(entries: list[dict], cfg: Config, paths: Paths, staging: Path) -> dict:
    """The index written and the staging folder swapped in for `paths.shards`, the key recorded;
    the records per split. On failure the staging folder is removed."""
    from resnet_pipeline.data import shard as shard_mod
    from resnet_pipeline.fileio import replace_dir

    try:
        index = shard_mod.write_index(entries, staging)
        replace_dir(staging, paths.shards)
    except BaseException:
        discard_shard(staging)
        raise
    record_key("shard", cfg, paths)
    return index["splits"]


def discard_shard(staging: Path) -> None:
    """Remove the staging folder of a shard stage that failed (`paths.shards` is as it was)."""
    shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- records of a run


def registration(paths: Paths) -> dict:
    """The register stage's record (`artifacts/registered.json`)."""
    from resnet_pipeline.fileio import read_json

    return read_json(paths.registered, "registration record")


def version_link(registry: str, name: str, version: int) -> str:
    """Where version `version` of `name` lives in `registry` (an s3:// URL or a file:// URI)."""
    from resnet_pipeline.registry.opening import version_location

    return version_location(registry, name, version)


STAGES: dict[str, Callable[[Config, Paths], Any]] = {
    "download": run_download,
    "split": run_split,
    "shard": run_shard,
    "train": run_train,
    "evaluate": run_evaluate,
    "register": run_register,
}


def run_stage(name: str, cfg: Config, paths: Paths) -> Any:
    """Run the stage `name` (one of `STAGES`) with `cfg` on `paths`; what it returns."""
    if name not in STAGES:
        raise ValueError(f"stage: received {name!r}; allowed: {', '.join(STAGES)}")
    return STAGES[name](cfg, paths)


def init_fetcher(registry) -> Callable[[str], Path]:
    """What training calls to fetch a `train.init` registry spec: the version pulled (and verified)
    into predict's cache; its folder."""
    from resnet_pipeline.predict import cache_dir
    from resnet_pipeline.registry import fetch_model

    return lambda spec: Path(fetch_model(spec, registry, cache_dir()))


def open_registry(cfg: Config, root: str | Path = ".", location: str | None = None):
    """The registry of `register.registry` (or `location`), with the params' S3 settings."""
    from resnet_pipeline import registry

    r = cfg.register
    return registry.open_registry(
        location or r.registry,
        endpoint_url=r.s3_endpoint_url,
        region=r.s3_region,
        addressing_style=r.s3_addressing_style,
        root=root,
        allow_unsafe_store=r.allow_unsafe_store,
    )


def stage_lock(command: str, paths: Paths) -> contextlib.AbstractContextManager:
    """The folder lock for one stage command (a flow holds it for its whole run).

    The workers of `train --workers N` run under their launcher's lock, on its token alone; the
    members of one `TF_CONFIG` cluster that share a folder run under the first one's lock. Any
    other command takes the lock, `TF_CONFIG` or not.
    """
    from resnet_pipeline import runlock

    owner = {"command": f"resnet-pipeline {command}"}
    if command != "train":
        return runlock.folder_lock(paths.root, owner)
    if token := os.environ.get(runlock.RUN_TOKEN_ENV):
        return runlock.under_launcher(paths.root, token)
    if member := _cluster_member():
        return runlock.cluster_lock(paths.root, {**owner, **member})
    return runlock.folder_lock(paths.root, owner)


def _cluster_member() -> dict | None:
    """`{"cluster": a digest of TF_CONFIG's cluster, "task": "worker1"}`, or None without a readable
    TF_CONFIG (the strategy reports a malformed one, naming it)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        cluster = json.dumps(spec["cluster"], sort_keys=True)
        task = f"{spec['task']['type']}{int(spec['task']['index'])}"
    except (ValueError, KeyError, TypeError):
        return None
    return {"cluster": hashlib.sha256(cluster.encode()).hexdigest()[:16], "task": task}
