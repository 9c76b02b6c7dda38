"""The whole pipeline as a Prefect 3 flow: the same stage functions as `dvc repro`, as tasks.

    python flows/pipeline.py [--params params.yaml] [--root .] [--set train.epochs=3]

Without PREFECT_API_URL, Prefect starts a temporary local server for the run. The flow body is a
plain sequence of task calls; the stage logic lives in `resnet_pipeline`. Retries are on the I/O
tasks only (download, register).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from resnet_pipeline import cli
from resnet_pipeline import config as config_mod
from resnet_pipeline.config import Config
from resnet_pipeline.paths import Paths


def _stage_task(name: str, **options):
    def run(cfg: Config, paths: Paths) -> Any:
        return cli.STAGES[name](cfg, paths)

    run.__name__ = name
    return task(run, name=name, cache_policy=NO_CACHE, **options)


download = _stage_task("download", retries=2, retry_delay_seconds=5)
split = _stage_task("split")
shard = _stage_task("shard")
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
