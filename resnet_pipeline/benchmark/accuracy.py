"""Does a recipe hold on another seed? split -> shard -> train -> evaluate for N values of `base.seed`.

    resnet-pipeline benchmark accuracy --seeds 5 [--set train.epochs=12 --set train.lr_schedule=onecycle ...]

Each seed gets its own split (the split is decided by the seed), shards, training run and test
evaluation, in a temporary folder; the dataset is downloaded once (the params' `download`). Printed
per seed: the training seconds (the stage's epochs, validation and checkpoints included) and the
test top-1 with its Wilson 95% interval; then the mean, the standard deviation and the 95% interval
of the mean (Student's t over the seeds).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from pathlib import Path

from resnet_pipeline.config import Config
from resnet_pipeline.paths import Paths


def mean_interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, low, high) of the 95% t interval of the mean."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0, mean, mean
    std = statistics.stdev(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def run(cfg: Config, seeds: int, first_seed: int = 0) -> dict:
    from resnet_pipeline.data.download import download
    from resnet_pipeline.data.shard import shard
    from resnet_pipeline.data.split import split
    from resnet_pipeline.evaluation import evaluate
    from resnet_pipeline.training.loop import train

    rows = []
    with tempfile.TemporaryDirectory(prefix="resnet-bench-accuracy-") as tmp:
        base_paths = Paths.from_config(cfg, root=Path(tmp) / "data-source")
        folder = download(cfg.download, base_paths.raw)
        for seed in range(first_seed, first_seed + seeds):
            run_cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, seed=seed))
            paths = Paths.from_config(run_cfg, root=Path(tmp) / f"seed-{seed}")
            split(run_cfg.split, seed, folder, paths.manifest, paths.labels)
            shard(run_cfg.shard, paths.manifest, folder.parent, paths.shards)
            summary = train(run_cfg.train, run_cfg, paths.shards, paths.labels, paths.model_dir, paths.checkpoints)
            metrics = evaluate(run_cfg.evaluate, paths.model_dir, paths.shards, paths.eval_dir)
            rows.append(
                {
                    "seed": seed,
                    "train_seconds": summary["loop_seconds"],
                    "top1": metrics["test"]["top1"],
                    "top1_ci95": [metrics["test_ci95"]["top1"]["low"], metrics["test_ci95"]["top1"]["high"]],
                    "examples": metrics["test"]["examples"],
                }
            )
    mean, std, low, high = mean_interval([r["top1"] for r in rows])
    low, high = max(0.0, low), min(1.0, high)  # a proportion
    seconds = [r["train_seconds"] for r in rows]
    return {
        "seeds": rows,
        "top1_mean": round(mean, 6),
        "top1_std": round(std, 6),
        "top1_mean_ci95": [round(low, 6), round(high, 6)],
        "train_seconds_mean": round(statistics.fmean(seconds), 2),
        "train_seconds_max": round(max(seconds), 2),
        "recipe": {k: v for k, v in dataclasses.asdict(cfg.train).items() if v != getattr(type(cfg.train)(), k)},
    }


def format_result(result: dict) -> str:
    lines = [f"{'seed':>5} {'train s':>8} {'top1':>8}  95% interval"]
    for r in result["seeds"]:
        lines.append(
            f"{r['seed']:>5} {r['train_seconds']:>8.1f} {r['top1']:>8.4f}  "
            f"[{r['top1_ci95'][0]:.4f}, {r['top1_ci95'][1]:.4f}] of {r['examples']}"
        )
    low, high = result["top1_mean_ci95"]
    lines.append(
        f"mean top1 {result['top1_mean']:.4f}  std {result['top1_std']:.4f}  95% CI of the mean "
        f"[{low:.4f}, {high:.4f}]  train seconds mean {result['train_seconds_mean']:.1f} "
        f"max {result['train_seconds_max']:.1f}"
    )
    if result["recipe"]:
        lines.append(
            "recipe (train.* differing from the defaults): "
            + ", ".join(f"{k}={v}" for k, v in sorted(result["recipe"].items()))
        )
    return "\n".join(lines)
