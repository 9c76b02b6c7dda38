"""What a registered version records about how it was made: for every stage, the params it ran
with and its key, and the data by content.

- download, split, shard: the key and params recorded inside their outputs (see `stagekeys`);
- train: `artifacts/model/params.yaml`, the config it trained with, and `train.json`, the shard
  index it trained on;
- evaluate and register: the config of this register run (both rerun whenever a key they read
  changes: `dvc repro` by dvc.yaml, the flow always).

`params.yaml` of a version is the full config, each key with the value of the stage that read it
(keys no stage reads, such as `shard.workers`, from this run's config).
"""

from __future__ import annotations

from typing import Any

import yaml

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.fileio import read_json, sha256_file
from resnet_pipeline.paths import Paths
from resnet_pipeline.stagekeys import DATA_STAGES, StaleDataError, project_dir, recorded, stage_key, stage_params


def _set(tree: dict, dotted: str, value: Any) -> None:
    *groups, last = dotted.split(".")
    node = tree
    for group in groups:
        node = node.setdefault(group, {})
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last].update(value)
    else:
        node[last] = value


def _data_stages(cfg: Config, paths: Paths) -> dict[str, dict]:
    stages = {}
    for stage in DATA_STAGES:
        record = recorded(stage, cfg, paths)
        if record is None:
            raise StaleDataError(
                f"{stage}: its output under {paths.data} carries no stage key; run the "
                f"{stage} stage again before registering (dvc repro, or the flow)"
            )
        stages[stage] = {"key": record["key"], "params": record.get("params") or {}}
    return stages


def assemble(cfg: Config, paths: Paths) -> dict:
    """`{"params": nested params, "stages": {stage: {key, params}}, "data": {...}}` for the model in
    `paths.model_dir`, evaluated into `paths.eval_dir`, about to be registered with `cfg`."""
    project = project_dir(paths.root)
    stages = _data_stages(cfg, paths)
    trained = config_mod.load_saved(paths.model_dir / config_mod.MODEL_PARAMS)
    summary = read_json(paths.model_dir / "train.json", "training summary")
    on = summary.get("data") or {}
    if on.get("shard_key") != stages["shard"]["key"] or on.get("index_sha256") != sha256_file(
        paths.shards / "index.json"
    ):
        raise StaleDataError(
            f"{paths.model_dir / 'train.json'}: the model was trained on shards "
            f"{str(on.get('shard_key'))[:24]}... (index {str(on.get('index_sha256'))[:12]}), but "
            f"{paths.shards / 'index.json'} is now {stages['shard']['key'][:24]}...: train again"
        )
    stages["train"] = {"key": stage_key("train", trained, project), "params": stage_params("train", trained, project)}
    for stage in ("evaluate", "register"):
        stages[stage] = {"key": stage_key(stage, cfg, project), "params": stage_params(stage, cfg, project)}
    params = cfg.to_dict()
    for stage in (*DATA_STAGES, "train", "evaluate", "register"):
        for dotted, value in stages[stage]["params"].items():
            _set(params, dotted, value)
    data = {
        "manifest_sha256": sha256_file(paths.manifest),
        "shards_index_sha256": on["index_sha256"],
        "stage_keys": {stage: stages[stage]["key"] for stage in DATA_STAGES},
    }
    return {"params": params, "stages": stages, "data": data}


def params_yaml(params: dict) -> str:
    """The version's params.yaml (from `assemble(...)["params"]`): loadable like params.yaml, with a
    header saying what it is."""
    return (
        "# The params each stage of this model ran with (see `stages` in the version's manifest.json)\n"
        + yaml.safe_dump(params, sort_keys=False)
    )
