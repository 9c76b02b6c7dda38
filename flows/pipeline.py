"""The whole pipeline as a Prefect 3 flow: the same stage functions as `dvc repro`, as tasks.

    python flows/pipeline.py [--params params.yaml] [--root .] [--set train.epochs=3]

Without PREFECT_API_URL, Prefect starts a temporary local server for the run. The flow body is a
plain sequence of task calls; the stage logic lives in `resnet_pipeline`. Retries are on the I/O
tasks only (download, register).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from resnet_pipeline import cli
from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.data import shard as shard_mod
from resnet_pipeline.fileio import new_staging_dir, replace_dir
from resnet_pipeline.paths import Paths


def _stage_task(name: str, **options):
    def run(cfg: Config, paths: Paths) -> Any:
        return cli.STAGES[name](cfg, paths)

    run.__name__ = name
    return task(run, name=name, cache_policy=NO_CACHE, **options)


download = _stage_task("download", retries=2, retry_delay_seconds=5)
split = _stage_task("split")


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(cfg: Config, paths: Paths) -> list[dict]:
    return shard_mod.plan_shards(cfg.shard, paths.manifest)


@task(name="write-shard", cache_policy=NO_CACHE)
def write_shard(plan: dict, cfg: Config, raw_dir: Path, staging: Path) -> dict:
    return shard_mod.write_shard(plan, raw_dir, staging, cfg.shard)


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


train = _stage_task("train")
evaluate = _stage_task("evaluate")
register = _stage_task("register", retries=2, retry_delay_seconds=5)


def metrics_markdown(cfg: Config, test_metrics: dict, registered: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in test_metrics.items())
    return (
        f"# ResNet-{cfg.train.depth} ({cfg.train.variant}) on {cfg.download.dataset}\n\n"
        f"{registered}\n\n| test metric | value |\n|---|---|\n{rows}\n"
    )


@flow(name="resnet-pipeline", log_prints=True)
def resnet_pipeline_flow(params: str = "params.yaml", root: str = ".", overrides: dict[str, Any] | None = None) -> dict:
    """download -> split -> shard -> train -> evaluate -> register, on the params file in `root`."""
    cfg = config_mod.load(Path(root) / params, overrides)
    paths = Paths.from_config(cfg, root)
    download(cfg, paths)
    split(cfg, paths)
    shard(cfg, paths)
    train(cfg, paths)
    test_metrics = evaluate(cfg, paths)
    registered = register(cfg, paths)
    create_markdown_artifact(metrics_markdown(cfg, test_metrics, registered), key="resnet-metrics",
                             description="Test metrics of the registered model")
    print(registered)
    return {"test": test_metrics, "registered": registered}


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
