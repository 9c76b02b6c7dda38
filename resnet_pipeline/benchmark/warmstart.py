"""Does a warm start transfer? Two tasks made from the digits, fine-tuned vs from scratch, in one run.

    resnet-pipeline benchmark warmstart [--epochs 3] [--source-epochs 10] [--seeds 1,2,3] [--workdir DIR]

Task A is the digits 0-5, task B the digits 6-9 (other classes: A's head does not fit and is
re-initialised). A ResNet-20 is trained on A, evaluated and registered in a local registry as
`digits-a`; then, for each seed, one run on B from scratch and one from `digits-a@champion`
(`train.init`), with the same params (`RECIPE`: a 10x smaller lr than the project's, no warmup)
and epochs, both evaluated on B's test split; and a third from scratch with the project's own
params (`scratch_default`), in case the recipe handicaps training from scratch. The from-scratch
runs are the reference. The same split seed is used throughout, so every seed tests the same
images.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
from pathlib import Path

from resnet_pipeline.config import Config, from_dict

log = logging.getLogger(__name__)

TASK_A = tuple(str(d) for d in range(6))
TASK_B = tuple(str(d) for d in range(6, 10))
SOURCE = "digits-a"
SPLIT_SEED = 42
RECIPE = {"lr": 0.01, "warmup_epochs": 0}


def _task_data(work: Path, name: str, classes: tuple[str, ...], digits: Path, cfg: Config) -> Path:
    """raw/digits with only `classes`, split and sharded under work/name; return that folder."""
    from resnet_pipeline.data.shard import shard
    from resnet_pipeline.data.split import split

    folder = work / name
    images = folder / "raw" / "digits"
    for label in classes:
        shutil.copytree(digits / label, images / label, dirs_exist_ok=True)
    split(cfg.split, SPLIT_SEED, images, folder / "manifest.parquet", folder / "labels.json")
    shard(cfg.shard, folder / "manifest.parquet", folder / "raw", folder / "shards")
    return folder


def _train_and_evaluate(cfg: Config, data: Path, out: Path, registry=None) -> dict:
    from resnet_pipeline.evaluation import evaluate
    from resnet_pipeline.stages import init_fetcher
    from resnet_pipeline.training.loop import train

    train(
        cfg.train,
        cfg,
        data / "shards",
        data / "labels.json",
        out / "model",
        out / "checkpoints",
        fetch_init=init_fetcher(registry) if registry else None,
    )
    return evaluate(cfg.evaluate, out / "model", data / "shards", out / "eval")["test"]


def run(
    work: str | Path,
    *,
    epochs: int = 3,
    source_epochs: int = 10,
    seeds: tuple[int, ...] = (1, 2, 3),
    overrides: dict | None = None,
    recipe: dict | None = None,
    project_params_arm: bool = True,
) -> dict:
    """Train A, register it, then B from scratch and warm-started per seed; return the figures.
    `project_params_arm=False` leaves out the from-scratch run with the project's params."""
    from resnet_pipeline.data.download import download
    from resnet_pipeline.registry import open_registry
    from resnet_pipeline.registry.stage import register_model

    work = Path(work)
    base = {"train": {"epochs": epochs, **(overrides or {})}}
    cfg = from_dict(base)
    digits = download(cfg.download, work / "raw")
    task_a = _task_data(work, "task-a", TASK_A, digits, cfg)
    task_b = _task_data(work, "task-b", TASK_B, digits, cfg)
    registry = open_registry(work / "registry")
    previous_cache = os.environ.get("RESNET_PIPELINE_CACHE")
    os.environ["RESNET_PIPELINE_CACHE"] = str(work / "cache")  # where train.init pulls the version to
    try:
        source_cfg = from_dict({"train": {**base["train"], "epochs": source_epochs}})
        source = _train_and_evaluate(source_cfg, task_a, work / "runs" / "a")
        record = register_model(
            registry,
            SOURCE,
            work / "runs/a/model",
            work / "runs/a/eval",
            work / "runs/a/registered.json",
            data_manifest=task_a / "manifest.parquet",
        )
        rows = []
        for seed in seeds:
            row = {"seed": seed}
            recipe = RECIPE if recipe is None else recipe
            arms: list[tuple[str, str | None, dict]] = [("scratch_default", None, {})] if project_params_arm else []
            for arm, init, extra in arms + [("scratch", None, recipe), ("warm", f"{SOURCE}@champion", recipe)]:
                arm_cfg = from_dict({"base": {"seed": seed}, "train": {**base["train"], **extra, "init": init}})
                row[arm] = _train_and_evaluate(
                    arm_cfg, task_b, work / "runs" / f"b-{arm}-{seed}", registry if init else None
                )["top1"]
            row["gain"] = row["warm"] - row["scratch"]
            rows.append(row)
            log.info("warmstart: seed %d: scratch %.4f, warm %.4f", seed, row["scratch"], row["warm"])
    finally:
        if previous_cache is None:
            os.environ.pop("RESNET_PIPELINE_CACHE", None)
        else:
            os.environ["RESNET_PIPELINE_CACHE"] = previous_cache
    gains = [r["gain"] for r in rows]
    return {
        "source": {
            "task": "digits " + ",".join(TASK_A),
            "epochs": source_epochs,
            "test_top1": source["top1"],
            "version": record["version"],
        },
        "target": {
            "task": "digits " + ",".join(TASK_B),
            "epochs": epochs,
            "recipe": RECIPE if recipe is None else recipe,
        },
        "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k in (overrides or {})},
        "rows": rows,
        "mean": {
            k: statistics.fmean(r.get(k, float("nan")) for r in rows)
            for k in ("scratch_default", "scratch", "warm", "gain")
        },
        "gain_sd": statistics.stdev(gains) if len(gains) > 1 else None,
        "min_gain": min(gains),
    }


def format_result(result: dict) -> str:
    lines = [
        f"source: ResNet-20 on {result['source']['task']}, {result['source']['epochs']} epochs, "
        f"test top-1 {result['source']['test_top1']:.4f}, registered as {SOURCE}:{result['source']['version']}",
        f"target: {result['target']['task']}, {result['target']['epochs']} epochs, test top-1; "
        f"scratch and warm (from {SOURCE}@champion) with {result['target']['recipe']}; "
        "scratch_default with the project's params; gain = warm - scratch",
        f"{'seed':>6} {'scratch_default':>16} {'scratch':>9} {'warm':>9} {'gain':>9}",
    ]
    lines += [
        f"{r['seed']:>6} {r.get('scratch_default', float('nan')):>16.4f} {r['scratch']:>9.4f} {r['warm']:>9.4f} "
        f"{r['gain']:>+9.4f}"
        for r in result["rows"]
    ]
    m = result["mean"]
    sd = f" (sd {result['gain_sd']:.4f})" if result["gain_sd"] is not None else ""
    lines.append(
        f"{'mean':>6} {m['scratch_default']:>16.4f} {m['scratch']:>9.4f} {m['warm']:>9.4f} "
        f"{m['gain']:>+9.4f}{sd}; smallest gain {result['min_gain']:+.4f}"
    )
    return "\n".join(lines)
