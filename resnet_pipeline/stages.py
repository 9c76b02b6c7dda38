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
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.paths import Paths
from resnet_pipeline.stagekeys import record_key, require_current


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

    registry = open_registry(cfg, paths.root) if config_mod.init_kind(cfg.train.init) == "registry" else None
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
        registry=registry,
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
        root=paths.root,
        provenance=assemble(cfg, paths),
        gate_options={
            "rule": r.gate,
            "min_value": r.min_value,
            "max_class_drop": r.max_class_drop,
            "bootstrap_samples": r.bootstrap_samples,
            "bootstrap_seed": r.bootstrap_seed,
        },
    )
    lines = [
        f"registered {record['name']}:{record['version']} in {record['registry']}",
        f"gate: {describe(record['gate'])}",
    ]
    if record["promotion"]["error"]:
        lines.append(f"promotion failed: {record['promotion']['error']}")
    return "\n".join(lines)


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
    """The folder lock for one stage command (a flow holds it for its whole run). The processes of
    a multi-worker training run (TF_CONFIG set) are one run: their launcher or cluster holds it."""
    from resnet_pipeline.runlock import folder_lock

    if os.environ.get("TF_CONFIG"):
        return contextlib.nullcontext()
    return folder_lock(paths.root, {"command": f"resnet-pipeline {command}"})
