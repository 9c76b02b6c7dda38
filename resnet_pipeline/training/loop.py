"""Train stage: a custom training loop over tf.distribute, resumable from checkpoints.

As Model Garden's `resnet_ctl_imagenet_main`: the model and optimizer are built inside
`strategy.scope()`, the data comes from `strategy.distribute_datasets_from_function` with a
per-replica batch of `global_batch_size / replicas`, the step is a `tf.function` around
`strategy.run`, the loss is averaged over the global batch and regularisation is scaled by the
number of replicas. `model.fit` is not used (it fails under MultiWorkerMirroredStrategy with Keras 3,
keras-team/keras#20585).

State (model, optimizer with its iteration count) is saved with `tf.train.CheckpointManager` every
`checkpoint_every_steps` steps and at each epoch end, in a folder keyed by the run's fingerprint
(training params, seed and data). A rerun of the same run resumes from the last checkpoint: it
recomputes the epoch from the step, replays the epoch's data order and skips the batches already
trained, so the run ends with the same number of steps as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import keras
import tensorflow as tf

from resnet_pipeline.config import Config, TrainConfig
from resnet_pipeline.data.pipeline import Preprocess, make_dataset, shard_files
from resnet_pipeline.data.shard import INDEX
from resnet_pipeline.fileio import atomic_write_json, read_json, sha256_file, staged_dir
from resnet_pipeline.models.resnet import build_resnet, model_arguments, recursion_limit

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_sec")


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    if cfg.lr_schedule == "cosine":
        if warmup > 0:
            lr = keras.optimizers.schedules.CosineDecay(
                cfg.lr / 10, decay_steps=total - warmup, warmup_target=cfg.lr, warmup_steps=warmup
            )
        else:
            lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total)
    else:
        lr = cfg.lr
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum)


def run_fingerprint(cfg: TrainConfig, seed: int, shards_dir: Path) -> str:
    """Identifies a training run: the checkpoints of another run are never resumed."""
    payload = {"train": asdict(cfg), "seed": seed, "index": sha256_file(shards_dir / INDEX)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _current_lr(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def train(
    cfg: TrainConfig,
    full_config: Config,
    shards_dir: str | Path,
    labels_path: str | Path,
    model_dir: str | Path,
    checkpoint_root: str | Path,
) -> dict:
    """Train on the train shards, validate on val each epoch, write `model_dir`; return the summary."""
    seed = full_config.base.seed
    shards_dir, model_dir, checkpoint_root = Path(shards_dir), Path(model_dir), Path(checkpoint_root)
    strategy = make_strategy(cfg.strategy)
    classes = read_json(labels_path, "labels")["classes"]
    train_files, n_train = shard_files(shards_dir, "train")
    val_files, n_val = shard_files(shards_dir, "val")
    gbs = cfg.global_batch_size
    steps_per_epoch = n_train // gbs
    if steps_per_epoch < 1:
        raise ValueError(f"train.global_batch_size: received {gbs}; the train split has only {n_train} images")
    replicas = strategy.num_replicas_in_sync
    if gbs % replicas:
        raise ValueError(f"train.global_batch_size: received {gbs}; must be a multiple of the {replicas} replicas")
    total_steps = cfg.epochs * steps_per_epoch

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = build_resnet(**model_arguments(cfg, num_classes=len(classes)))
        optimizer = make_optimizer(cfg, steps_per_epoch)
        optimizer.build(model.trainable_variables)

    ckpt_dir = checkpoint_root / run_fingerprint(cfg, seed, shards_dir)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=2)
    history_path = ckpt_dir / "history.json"
    history: list[dict] = []
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
        step = int(optimizer.iterations.numpy())
        history = [h for h in read_json(history_path, "history") if h["epoch"] < step // steps_per_epoch] if history_path.exists() else []
        log.info("train: resuming from %s at step %d of %d", manager.latest_checkpoint, step, total_steps)
    else:
        log.info("train: starting %s, %d steps (%d epochs x %d)", model.name, total_steps, cfg.epochs, steps_per_epoch)

    def step_fn(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=gbs)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(per_example), correct

    @tf.function
    def train_step(iterator):
        loss_sum, correct = strategy.run(step_fn, args=next(iterator))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    @tf.function
    def eval_step(images, labels):
        logits = model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(per_example), correct

    prep = Preprocess.from_train(cfg)
    val_ds = make_dataset(val_files, gbs, prep, training=False)
    started = time.perf_counter()
    trained_images = 0
    step = int(optimizer.iterations.numpy())
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)

        def dataset_fn(ctx: tf.distribute.InputContext, epoch=epoch, skip=done_in_epoch):
            return make_dataset(train_files, ctx.get_per_replica_batch_size(gbs), prep, training=True,
                                seed=seed + epoch, input_context=ctx, skip_batches=skip)

        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
        bar = keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "accuracy", "img/s"],
                                  verbose=1 if _interactive() else 2)
        print(f"Epoch {epoch + 1}/{cfg.epochs}")
        loss_sum = correct_sum = seen = 0.0
        epoch_start = time.perf_counter()
        for i in range(done_in_epoch, steps_per_epoch):
            l, c = train_step(iterator)
            step += 1
            loss_sum, correct_sum, seen = loss_sum + float(l), correct_sum + float(c), seen + gbs
            rate = seen / (time.perf_counter() - epoch_start)
            bar.update(i + 1, [("loss", loss_sum / seen), ("accuracy", correct_sum / seen), ("img/s", rate)])
            if step % cfg.checkpoint_every_steps == 0 and step % steps_per_epoch:
                manager.save(checkpoint_number=step)
        trained_images += seen
        val_loss = val_correct = 0.0
        for images, labels in val_ds:
            l, c = eval_step(images, labels)
            val_loss, val_correct = val_loss + float(l), val_correct + float(c)
        history.append({
            "epoch": epoch, "step": step, "lr": _current_lr(optimizer),
            "train_loss": loss_sum / seen, "train_accuracy": correct_sum / seen,
            "val_loss": val_loss / n_val, "val_accuracy": val_correct / n_val,
            "images_per_sec": seen / (time.perf_counter() - epoch_start),
        })
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in history[-1].items()})
        atomic_write_json(history_path, history)
        manager.save(checkpoint_number=step)
    wall = time.perf_counter() - started

    summary = {
        "steps": step, "epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch,
        "global_batch_size": gbs, "replicas": replicas, "strategy": cfg.strategy,
        "wall_time_sec": round(wall, 3),
        "images_per_sec": round(trained_images / wall, 2) if wall > 0 and trained_images else None,
        "final": history[-1] if history else None,
    }
    _write_model_dir(model, full_config, history, summary, classes, model_dir)
    return summary


def _interactive() -> bool:
    import sys

    return sys.stdout.isatty()


def _write_model_dir(model, full_config: Config, history, summary, classes, model_dir: Path) -> None:
    """model.keras, the resolved config, history.csv and train.json, swapped in as a whole."""
    with staged_dir(model_dir) as tmp:
        with recursion_limit():  # ResNet-1202's graph is deeper than Python's default limit
            model.save(tmp / "model.keras")
        (tmp / "config.yaml").write_text(full_config.to_yaml())
        atomic_write_json(tmp / "labels.json", {"classes": classes})
        atomic_write_json(tmp / "train.json", summary)
        with open(tmp / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
