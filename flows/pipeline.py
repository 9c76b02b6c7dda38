"""The whole pipeline as a Prefect 3 flow: the same stage functions as `dvc repro`, as tasks.

    python flows/pipeline.py [--params params.yaml] [--root .] [--set train.epochs=3]

Without PREFECT_API_URL, Prefect starts a temporary local server for the run; `prefect.yaml` deploys
the flow on a schedule to a work pool (see the README). The stage logic lives in `resnet_pipeline`.

- Retries are on the I/O tasks (download, register).
- The data tasks (download, split, shard) are cached like `dvc repro` skips stages: the cache key
  of a stage hashes the params it reads and the code it runs, as `dvc.yaml` lists them, and the keys
  of the stages it depends on. A rerun with only `train.*` changed finds the data tasks `Cached`.
  A cached result is used only while the stage's outputs are still on disk; if they are gone, the
  task runs again and refreshes its cache entry.
- Results are persisted (Prefect's result storage, `~/.prefect/storage` unless configured).
- Each run publishes a Markdown artifact (test metrics, the gate's decision with both figures, the
  registered version and how to pull it) and a table artifact (per-class precision, recall, F1).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from resnet_pipeline import cli
from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.data import shard as shard_mod
from resnet_pipeline.fileio import new_staging_dir, read_json, replace_dir
from resnet_pipeline.paths import Paths

PROJECT = Path(__file__).resolve().parents[1]
DATA_STAGES = ("download", "split", "shard")


# --------------------------------------------------------------------------- cache keys from dvc.yaml


@lru_cache(maxsize=4)
def _dvc_stages(dvc_yaml: str) -> dict:
    return yaml.safe_load(Path(dvc_yaml).read_text())["stages"]


def _name(entry: str | dict) -> str:
    """A dvc.yaml list entry: `path` or `{path: {options}}`."""
    return entry if isinstance(entry, str) else next(iter(entry))


def _param_value(params: dict, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def _tree_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        h.update(f.relative_to(path.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stage_key(stage: str, cfg: Config, project: Path = PROJECT) -> str:
    """What `dvc repro` would compare for `stage`: its params, its code deps and, for a dep that is
    another stage's output, that stage's key."""
    stages = _dvc_stages(str(project / "dvc.yaml"))
    producers = {_name(out): name for name, spec in stages.items() for out in spec.get("outs", [])}
    params, h = cfg.to_dict(), hashlib.sha256(stage.encode())
    for item in stages[stage].get("params", []):
        name = _name(item)
        h.update(json.dumps([name, _param_value(params, name)], sort_keys=True, default=str).encode())
    for dep in map(_name, stages[stage].get("deps", [])):
        if dep in producers:
            h.update(stage_key(producers[dep], cfg, project).encode())
        else:
            h.update(_tree_sha256(project / dep).encode())
    return f"{stage}-{h.hexdigest()}"


def _cache_key(context, parameters) -> str:
    return stage_key(context.task.name, parameters["cfg"])


def outputs_present(stage: str, paths: Paths) -> bool:
    """Are the stage's outputs on disk (the condition for using its cached result)?"""
    return {
        "download": lambda: paths.raw.is_dir() and any(paths.raw.iterdir()),
        "split": lambda: paths.manifest.is_file() and paths.labels.is_file(),
        "shard": lambda: (paths.shards / "index.json").is_file(),
    }[stage]()


# --------------------------------------------------------------------------- tasks


def _stage_task(name: str, **options):
    def run(cfg: Config, paths: Paths) -> Any:
        return cli.STAGES[name](cfg, paths)

    run.__name__ = name
    return task(run, name=name, **options)


_data_options = {"cache_key_fn": _cache_key, "persist_result": True}
download = _stage_task("download", retries=2, retry_delay_seconds=5, **_data_options)
split = _stage_task("split", **_data_options)
train = _stage_task("train", cache_policy=NO_CACHE, persist_result=True)
evaluate = _stage_task("evaluate", cache_policy=NO_CACHE, persist_result=True)
register = _stage_task("register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, persist_result=True)


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(cfg: Config, paths: Paths) -> list[dict]:
    return shard_mod.plan_shards(cfg.shard, paths.manifest)


@task(name="write-shard", cache_policy=NO_CACHE)
def write_shard(plan: dict, cfg: Config, raw_dir: Path, staging: Path) -> dict:
    return shard_mod.write_shard(plan, raw_dir, staging, cfg.shard)


@task(name="shard", **_data_options)
def shard(cfg: Config, paths: Paths) -> dict:
    """The shard stage with the writing of each shard a task of its own (`write_shard.map`), so a
    Dask or Ray task runner can spread it over machines; the shards replace the old ones at the end."""
    plans = plan_shards(cfg, paths)
    staging = new_staging_dir(paths.shards)
    try:
        entries = write_shard.map(plans, cfg=unmapped(cfg), raw_dir=unmapped(paths.raw), staging=unmapped(staging)).result()
        index = shard_mod.write_index(entries, staging)
        replace_dir(staging, paths.shards)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index["splits"]


# --------------------------------------------------------------------------- artifacts


def _registry_link(registry: str, name: str, version: int) -> str:
    if registry.startswith("s3://"):
        return f"{registry.rstrip('/')}/models/{name}/versions/{version}/"
    return Path(registry, "models", name, "versions", str(version)).resolve().as_uri() + "/"


def report_markdown(cfg: Config, record: dict) -> str:
    """Metrics, the gate's decision with both figures, and the registered version."""
    name, version, gate = record["name"], record["version"], record["gate"]
    test = record["metrics"]["test"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in test.items())
    champion = "none yet" if gate["champion"] is None else f"{gate['champion']} (version {gate['champion_version']})"
    promoted = record["promotion"]
    verdict = ("promoted" if promoted["promoted"] else
               f"promotion failed: {promoted['error']}" if promoted["error"] else "not promoted")
    link = _registry_link(record["registry"], name, version)
    return (
        f"# {name}:{version} — ResNet-{cfg.train.depth} ({cfg.train.variant}) on {cfg.download.dataset}\n\n"
        f"Registered as **[{name}:{version}]({link})** in `{record['registry']}`.\n\n"
        f"| test metric | value |\n|---|---|\n{rows}\n\n"
        f"## Gate: {verdict} to `{gate['alias']}`\n\n"
        f"| | {gate['metric']} |\n|---|---|\n| this version | {gate['candidate']} |\n"
        f"| {gate['alias']} | {champion} |\n\n"
        f"{gate['reason']}\n\n"
        f"Pull it with `resnet-pipeline registry pull {name}:{version} DEST --registry {record['registry']}`.\n"
    )


def per_class_table(eval_dir: Path) -> list[dict]:
    with open(eval_dir / "per_class.csv", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- the flow


@flow(name="resnet-pipeline", log_prints=True, persist_result=True)
def resnet_pipeline_flow(params: str = "params.yaml", root: str = ".", overrides: dict[str, Any] | None = None,
                         dataset: str | None = None, depth: int | None = None, epochs: int | None = None) -> dict:
    """download -> split -> shard -> train -> evaluate -> register.

    `params` is read relative to `root` unless absolute; `overrides` are `{"group.key": value}` like
    `--set`; `dataset`, `depth` and `epochs` are shortcuts for `download.dataset`, `train.depth` and
    `train.epochs`. Everything is checked like params.yaml before any stage runs.
    """
    cfg = load_config(params, root, overrides, dataset=dataset, depth=depth, epochs=epochs)
    paths = Paths.from_config(cfg, root)
    for stage_task, name in ((download, "download"), (split, "split"), (shard, "shard")):
        stage_task.with_options(refresh_cache=not outputs_present(name, paths))(cfg, paths)
    train(cfg, paths)
    evaluate(cfg, paths)
    print(register(cfg, paths))
    record = read_json(paths.registered, "registration record")
    create_markdown_artifact(report_markdown(cfg, record), key="resnet-report",
                             description=f"{record['name']}:{record['version']}: metrics, gate, registry")
    create_table_artifact(per_class_table(paths.eval_dir), key="resnet-per-class",
                          description="Per-class precision, recall and F1 on the test split")
    return {"test": record["metrics"]["test"], "name": record["name"], "version": record["version"],
            "registry": record["registry"], "promoted": record["promotion"]["promoted"]}


def load_config(params: str, root: str, overrides: dict[str, Any] | None = None, **shortcuts: Any) -> Config:
    """The flow's parameters as a validated Config (a ConfigError names the bad key or value)."""
    merged = dict(overrides or {})
    for key, dotted in (("dataset", "download.dataset"), ("depth", "train.depth"), ("epochs", "train.epochs")):
        if shortcuts.get(key) is not None:
            merged[dotted] = shortcuts[key]
    path = Path(params) if Path(params).is_absolute() else Path(root) / params
    return config_mod.load(path, merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE")
    args = parser.parse_args(argv)
    resnet_pipeline_flow(params=args.params, root=args.root, overrides=cli._parse_set(args.set))
    return 0


if __name__ == "__main__":
    sys.exit(main())
