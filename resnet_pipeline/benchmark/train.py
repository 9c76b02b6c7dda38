"""The train stage's throughput over a whole short run, against its own bare step and Keras `model.fit`.

    resnet-pipeline benchmark train [--epochs N] [--rounds 3] [--set train.global_batch_size=128 ...]

In one run, on the data of the params (the digits are made in a temporary folder if the project
has none):

- **stage**: `resnet-pipeline train`'s loop over `--epochs` epochs (the params' `train.epochs`
  by default), validation and checkpoints included, model export excluded;
- **bare step**: the same trainer's compiled steps on one batch held in memory (no input pipeline,
  no validation, no checkpoints), as many as the stage's figure covers: the most the stage could do;
- **model.fit**: the same model, optimizer, schedule and `tf.data` input (the stage's: all epochs
  in one dataset, decoded once when it fits in memory), validated on the stage's cadence, through
  Keras' own loop.

Each arm runs in a fresh process of its own (spawned: no TensorFlow state, thread pools or
allocator left behind by the arm before), and the arms' order rotates from round to round (each
runs first, second and third equally often).
Each figure leaves out its first chunk of steps (tracing), the same number of images for all, and
the first run of validation (the stage traces and runs it at start-up; Keras' test step gets an
`evaluate` before `fit`).
Printed as images/s and as ratios stage / bare step and stage / model.fit; beside them the same
ratios in the process's CPU time per image, which other load on the machine moves less. The
stage's time is split into its compiled steps (on its own input: their images/s against the bare
step's is what the input costs the steps), validation, checkpoints and the rest (the host's
figures, progress and records between chunks).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from resnet_pipeline.config import Config
from resnet_pipeline.paths import Paths

log = logging.getLogger(__name__)


def ensure_data(cfg: Config, root: Path) -> Paths:
    """The project's shards if they exist, else the digits taken through download, split and shard in `root`."""
    paths = Paths.from_config(cfg)
    if (paths.shards / "index.json").exists() and paths.labels.exists():
        return paths
    from resnet_pipeline.data.download import download
    from resnet_pipeline.data.shard import shard
    from resnet_pipeline.data.split import split

    fresh = Config()
    paths = Paths.from_config(fresh, root=root)
    folder = download(fresh.download, paths.raw)
    split(fresh.split, fresh.base.seed, folder, paths.manifest, paths.labels)
    shard(fresh.shard, paths.manifest, paths.raw, paths.shards)
    return paths


def _stage(cfg: Config, paths: Paths, work: Path) -> dict:
    from resnet_pipeline.training.loop import train

    summary = train(cfg.train, cfg, paths.shards, paths.labels, work / "model", work / "checkpoints")
    images = summary["steps"] * summary["global_batch_size"] - summary["first_chunk_images"]
    seconds = summary["loop_seconds"] - summary["first_chunk_seconds"]
    cpu = summary["loop_cpu_seconds"] - summary["first_chunk_cpu_seconds"]
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_sec": round(images / seconds, 2),
        "cpu_ms_per_image": round(cpu / images * 1e3, 4),
        "first_chunk_images": summary["first_chunk_images"],
        "steps_seconds": summary["steps_seconds"],
        "steps_images_per_sec": round(images / summary["steps_seconds"], 2),
        "validation_seconds": summary["validation_seconds"],
        "checkpoint_seconds": summary["checkpoint_seconds"],
    }


def _bare(cfg: Config, paths: Paths, steps: int, skip_images: int) -> dict:
    import tensorflow as tf

    from resnet_pipeline.data.pipeline import Preprocess, make_dataset, shard_files
    from resnet_pipeline.fileio import read_json
    from resnet_pipeline.training.strategy import make_strategy
    from resnet_pipeline.training.trainer import Trainer

    strategy, _ = make_strategy(cfg.train.strategy, cfg.train.cpu_devices)
    files, n_train = shard_files(paths.shards, "train")
    gbs = cfg.train.global_batch_size
    trainer = Trainer(cfg.train, strategy, len(read_json(paths.labels)["classes"]), n_train // gbs)
    trainer.build()
    batch = next(iter(make_dataset(files, gbs, Preprocess.from_train(cfg.train), training=True, seed=0)))

    def dataset_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(gbs)
        return tf.data.Dataset.from_tensors(tuple(x[:per_replica] for x in batch)).repeat()

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    chunk = cfg.train.summary_every_steps
    warm = max(1, -(-skip_images // (gbs * chunk)))
    for _ in range(warm):
        trainer.train_steps(iterator, chunk, False)
    start, cpu, done = time.perf_counter(), time.process_time(), 0
    while done < steps:
        n = min(chunk, steps - done)
        trainer.train_steps(iterator, n, False)
        done += n
    return _figures(done * gbs, time.perf_counter() - start, time.process_time() - cpu)


def _fit(cfg: Config, paths: Paths, skip_images: int) -> dict:
    import keras

    from resnet_pipeline.data.pipeline import Preprocess, decode_in_memory, make_dataset, shard_files, train_epochs
    from resnet_pipeline.fileio import read_json
    from resnet_pipeline.models.resnet import build_resnet, model_arguments
    from resnet_pipeline.training import optim

    t = cfg.train
    files, n_train = shard_files(paths.shards, "train")
    val_files, _ = shard_files(paths.shards, "val")
    gbs, classes = t.global_batch_size, len(read_json(paths.labels)["classes"])
    steps_per_epoch = n_train // gbs
    keras.utils.set_random_seed(cfg.base.seed)
    # the same L2 as the trainer's 0.5 x decay x sum(w^2), as Keras regularizers on the kernels
    model = build_resnet(**model_arguments(t, num_classes=classes), weight_decay=t.weight_decay / 2)
    model.compile(
        optimizer=optim.make_optimizer(t, optim.make_schedule(t, steps_per_epoch)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=t.jit_compile,
    )
    prep = Preprocess.from_train(t)
    # the stage's own input: every epoch in one dataset, decoded once when the split fits in memory
    train_ds = train_epochs(
        files,
        gbs,
        prep,
        seed=cfg.base.seed,
        first_epoch=0,
        epochs=t.epochs,
        steps_per_epoch=steps_per_epoch,
        in_memory=decode_in_memory(files, n_train, prep),
    )
    val_ds = make_dataset(val_files, gbs, prep, training=False)
    skip_batches = max(1, skip_images // gbs)

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches == skip_batches:
                self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, logs=None):
            self.end, self.cpu = time.perf_counter(), time.process_time() - self.cpu

    clock = Clock()
    model.evaluate(val_ds, verbose=0)  # Keras' test step traced and run first, as the stage's at start-up
    # the stage's cadence: every validate_every_epochs epochs, and after the last
    validated = sorted({e for e in range(1, t.epochs + 1) if e % t.validate_every_epochs == 0} | {t.epochs})
    model.fit(
        train_ds,
        epochs=t.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=val_ds,
        validation_freq=validated,
        verbose=0,
        callbacks=[clock],
    )
    return _figures((t.epochs * steps_per_epoch - skip_batches) * gbs, clock.end - clock.start, clock.cpu)


def _figures(images: int, seconds: float, cpu_seconds: float) -> dict:
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_sec": round(images / seconds, 2),
        "cpu_ms_per_image": round(cpu_seconds / images * 1e3, 4),
    }


ARMS = ("stage", "bare_step", "model_fit")


def arms_order(index: int) -> tuple[str, ...]:
    """The arms of round `index`, rotated: over three rounds each runs first, second and third once."""
    return ARMS[index % 3 :] + ARMS[: index % 3]


def _arm(name: str, cfg: Config, paths: Paths, work: Path, steps: int, first: int) -> dict:
    """One arm's figures, in the process that calls it; `pid` names that process."""
    if name == "stage":
        figures = _stage(cfg, paths, work)
    elif name == "bare_step":
        figures = _bare(cfg, paths, steps=steps, skip_images=first)
    else:
        figures = _fit(cfg, paths, skip_images=first)
    return {**figures, "pid": os.getpid()}


def _in_own_process(name: str, cfg: Config, paths: Paths, work: Path, steps: int, first: int) -> dict:
    """`_arm` in a spawned process of its own, waited for; its error, if any, raised here."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_arm, name, cfg, paths, work, steps, first).result()


def _round(cfg: Config, paths: Paths, work: Path, index: int) -> dict:
    """Stage, bare step and model.fit, each in a process of its own, in an order that rotates with
    the round's `index` (`arms_order`), and their ratios."""
    from resnet_pipeline.data.pipeline import shard_files
    from resnet_pipeline.training.run import _steps_to_next_stop

    t = cfg.train
    steps_per_epoch = shard_files(paths.shards, "train")[1] // t.global_batch_size
    # the stage's first chunk (tracing) is left out of every arm, the same number of images for all
    first = _steps_to_next_stop(0, steps_per_epoch, t) * t.global_batch_size
    steps = t.epochs * steps_per_epoch - first // t.global_batch_size
    order = arms_order(index)
    arms = {}
    for name in order:
        arms[name] = _in_own_process(name, cfg, paths, work, steps, first)
        log.info("benchmark train: round %d, %s: %.1f images/s", index + 1, name, arms[name]["images_per_sec"])
    if arms["stage"]["first_chunk_images"] != first:
        raise RuntimeError(
            f"benchmark train: the stage's first chunk held {arms['stage']['first_chunk_images']} images, not {first}"
        )
    stage, bare, fit = (arms[name] for name in ARMS)
    return {
        "order": list(order),
        "stage": stage,
        "bare_step": bare,
        "model_fit": fit,
        "stage_vs_bare_step": round(stage["images_per_sec"] / bare["images_per_sec"], 3),
        "stage_vs_model_fit": round(stage["images_per_sec"] / fit["images_per_sec"], 3),
        # the same ratios in CPU time per image (bare or fit over stage): less moved by other load
        "cpu_stage_vs_bare_step": round(bare["cpu_ms_per_image"] / stage["cpu_ms_per_image"], 3),
        "cpu_stage_vs_model_fit": round(fit["cpu_ms_per_image"] / stage["cpu_ms_per_image"], 3),
    }


def medians(results: list[dict]) -> dict:
    """Each arm's figures as medians over the rounds, and each ratio as the median of the rounds'
    own ratios (not the ratio of the medians: the three arms of a round ran back to back, so they
    saw about the same load)."""
    figures = {
        key: {
            name: round(statistics.median(r[key][name] for r in results), 4)
            for name in results[0][key]
            if isinstance(results[0][key][name], (int, float)) and name != "pid"
        }
        for key in ARMS
    }
    ratios = {key: round(statistics.median(r[key] for r in results), 3) for key in results[0] if "_vs_" in key}
    return {**figures, **ratios}


def run(cfg: Config, epochs: int | None = None, rounds: int = 1) -> dict:
    """`rounds` rounds of stage, bare step and model.fit on the same data and settings (`epochs`
    epochs, the params' own when None), with their `medians`."""
    epochs = epochs or cfg.train.epochs
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
    with tempfile.TemporaryDirectory(prefix="resnet-bench-train-") as tmp:
        work = Path(tmp)
        paths = ensure_data(cfg, work / "project")
        results = []
        for index in range(rounds):
            results.append(_round(cfg, paths, work / f"round-{index}", index))
            log.info("benchmark train: round %d of %d: %s", index + 1, rounds, format_ratios(results[-1]))
    return {
        "model": f"ResNet-{cfg.train.depth} ({cfg.train.variant})",
        "epochs": epochs,
        "global_batch_size": cfg.train.global_batch_size,
        "rounds": results,
        **medians(results),
    }


def format_ratios(result: dict) -> str:
    return (
        f"stage / bare step: {result['stage_vs_bare_step']:.3f}x   "
        f"stage / model.fit: {result['stage_vs_model_fit']:.3f}x   (in CPU time per image: "
        f"{result['cpu_stage_vs_bare_step']:.3f}x and {result['cpu_stage_vs_model_fit']:.3f}x)"
    )


def format_result(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['epochs']} epochs, global batch {result['global_batch_size']}",
        f"{'':<12} {'images':>8} {'seconds':>9} {'images/s':>10} {'CPU ms/image':>13}",
    ]
    for key, label in (("stage", "stage"), ("bare_step", "bare step"), ("model_fit", "model.fit")):
        r = result[key]
        lines.append(
            f"{label:<12} {r['images']:>8} {r['seconds']:>9.2f} {r['images_per_sec']:>10.1f} "
            f"{r['cpu_ms_per_image']:>13.3f}"
        )
    stage = result["stage"]
    total, steps = stage["seconds"], stage["steps_seconds"]
    val, ckpt = stage["validation_seconds"], stage["checkpoint_seconds"]
    lines.append(
        f"stage's time: in its steps {steps:.2f} s ({steps / total:.1%}; {stage['steps_images_per_sec']:.1f} "
        f"images/s, {stage['steps_images_per_sec'] / result['bare_step']['images_per_sec']:.3f}x the bare step), "
        f"validation {val:.2f} s ({val / total:.1%}), checkpoints {ckpt:.2f} s ({ckpt / total:.1%}), "
        f"the rest {total - steps - val - ckpt:.2f} s ({(total - steps - val - ckpt) / total:.1%})"
    )
    rounds = result["rounds"]
    if len(rounds) > 1:
        lines += [f"round {i + 1} ({', '.join(r['order'])}): {format_ratios(r)}" for i, r in enumerate(rounds)]
        lines.append(f"medians over {len(rounds)} rounds:")
    lines.append(format_ratios(result))
    return "\n".join(lines)
