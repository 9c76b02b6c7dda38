"""Train stage: a custom training loop over tf.distribute that survives being killed.

    resnet-pipeline train [--set train.strategy=mirrored] [--workers N]

As Model Garden's `resnet_ctl_imagenet_main`: the strategy is created first, the model and
optimizer are built inside `strategy.scope()`, the data comes from
`strategy.distribute_datasets_from_function` with a per-replica batch of
`global_batch_size / replicas`, the step is a `tf.function` around `strategy.run`, the loss is
averaged over the global batch and weight decay is scaled by the number of replicas. `model.fit`
is not used (it fails under MultiWorkerMirroredStrategy with Keras 3, keras-team/keras#20585).

State (model, optimizer, step, the epoch's running sums) is saved with
`tf.train.CheckpointManager` every `checkpoint_every_steps` steps and at each epoch end, in a
folder keyed by the run's fingerprint (the params that change the result, the seed and the data).
A rerun resumes from the last checkpoint: the lr schedule follows the restored step, the epoch's
data order is replayed and the batches already trained are skipped, so no step is trained twice
or skipped. SIGTERM (how preemption arrives) is noted, agreed on by all workers within the step,
and answered by a checkpoint at that step and `Preempted`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import signal
import tempfile
import threading
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
from resnet_pipeline.training import optim
from resnet_pipeline.training.preempt import Preempted  # noqa: F401  (raised here, caught by callers)
from resnet_pipeline.training.strategy import Cluster, make_strategy

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_sec")
STEP_FIELDS = ("step", "loss", "accuracy", "lr")
# params that do not change what is trained: a run resumes across changes of these
NOT_IN_FINGERPRINT = ("checkpoint_every_steps", "keep_checkpoints", "summary_every_steps")



class WorkerFailed(RuntimeError):
    """A collective operation failed: another worker died or became unreachable."""


class _SigtermWatcher:
    """Notes SIGTERM instead of dying at once; the loop stops at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("train: SIGTERM received; saving a checkpoint after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_fingerprint(cfg: TrainConfig, seed: int, shards_dir: Path) -> str:
    """Identifies a training run: the checkpoints of another run are never resumed."""
    params = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    payload = {"train": params, "seed": seed, "index": sha256_file(shards_dir / INDEX)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def trained_on(shards_dir: Path) -> dict:
    """The data a run trains on, by content: the sha256 of the shard index and the shard stage key
    recorded in it (None for shards written without one)."""
    index = read_json(shards_dir / INDEX, "shard index")
    return {"index_sha256": sha256_file(shards_dir / INDEX),
            "shard_key": index.get("stage_key") if isinstance(index, dict) else None}


def set_precision(precision: str) -> None:
    keras.mixed_precision.set_global_policy("float32" if precision == "float32" else precision)


def train(
    cfg: TrainConfig,
    full_config: Config,
    shards_dir: str | Path,
    labels_path: str | Path,
    model_dir: str | Path,
    checkpoint_root: str | Path,
    *,
    tensorboard_root: str | Path | None = None,
    strategy: tf.distribute.Strategy | None = None,
    cluster: Cluster | None = None,
) -> dict:
    """Train on the train shards, validate on val each epoch, write `model_dir`; return the summary.

    Creates the strategy of `cfg.strategy` unless one is given (with its `cluster`); raises
    `Preempted` after saving when SIGTERM arrives, `WorkerFailed` when another worker dies.
    """
    if strategy is None:
        strategy, cluster = make_strategy(cfg.strategy, cfg.cpu_devices)
    cluster = cluster or Cluster()
    seed = full_config.base.seed
    shards_dir, model_dir, checkpoint_root = Path(shards_dir), Path(model_dir), Path(checkpoint_root)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    classes = read_json(labels_path, "labels")["classes"]
    train_files, n_train = shard_files(shards_dir, "train")
    val_files, n_val = shard_files(shards_dir, "val")
    gbs, replicas = cfg.global_batch_size, strategy.num_replicas_in_sync
    steps_per_epoch = n_train // gbs
    if steps_per_epoch < 1:
        raise ValueError(f"train.global_batch_size: received {gbs}; the train split has only {n_train} images")
    if gbs % replicas:
        raise ValueError(f"train.global_batch_size: received {gbs}; must be a multiple of the {replicas} replicas")
    total_steps = cfg.epochs * steps_per_epoch

    keras.utils.set_random_seed(seed)
    set_precision(cfg.precision)
    schedule = optim.make_schedule(cfg, steps_per_epoch)
    try:
        with strategy.scope():
            model = build_resnet(**model_arguments(cfg, num_classes=len(classes)))
            optimizer = optim.make_optimizer(cfg, schedule)
            optimizer.build(model.trainable_variables)
    finally:
        set_precision("float32")  # the policy is global: leave it as found
    decayed = optim.decayed_variables(model, cfg.decay_bn_and_bias) if cfg.weight_decay else []

    # the position in the run and the running sums of the current epoch, saved with the weights
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    sums = {k: tf.Variable(0.0, dtype=tf.float64, trainable=False, name=k)
            for k in ("epoch_loss", "epoch_correct", "epoch_seen", "epoch_seconds", "run_images", "run_seconds")}
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var, **sums)
    run_dir = checkpoint_root / run_fingerprint(cfg, seed, shards_dir)
    # MultiWorkerMirroredStrategy: every worker saves (saving is collective); only the chief keeps it
    scratch = None if cluster.is_chief else Path(tempfile.mkdtemp(prefix=f"resnet-{cluster.name}-"))
    manager = tf.train.CheckpointManager(checkpoint, str(scratch or run_dir), max_to_keep=cfg.keep_checkpoints)
    latest = tf.train.latest_checkpoint(str(run_dir))
    history_path, steps_path = run_dir / "history.json", run_dir / "steps.csv"
    history: list[dict] = []
    step_rows: list[dict] = []
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        step = int(step_var.numpy())
        history = [h for h in read_json(history_path, "history") if h["epoch"] < step // steps_per_epoch] if history_path.exists() else []
        step_rows = [r for r in _read_steps(steps_path) if r["step"] <= step]
        log.info("train: resuming from %s at step %d of %d", latest, step, total_steps)
    else:
        log.info("train: starting %s, %d steps (%d epochs x %d), global batch %d over %d replica(s)",
                 model.name, total_steps, cfg.epochs, steps_per_epoch, gbs, replicas)
    writer = (tf.summary.create_file_writer(str(Path(tensorboard_root) / run_dir.name))
              if tensorboard_root and cluster.is_chief else tf.summary.create_noop_writer())

    num_classes = len(classes)
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def gradients(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = optim.per_example_loss(labels, logits, num_classes, cfg.label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=gbs)
            if decayed:
                loss += tf.nn.scale_regularization_loss(optim.weight_decay_loss(decayed, cfg.weight_decay))
            scaled = optimizer.scale_loss(loss) if loss_scaled else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        predicted = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
        return grads, tf.reduce_sum(per_example), correct

    if cfg.jit_compile:  # XLA compiles the forward and backward pass; the update stays outside
        gradients = tf.function(gradients, jit_compile=True)

    def step_fn(images, labels, stop):
        grads, loss_sum, correct = gradients(images, labels)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss_sum, correct, tf.identity(stop)  # per replica: summed, it says if any worker was told to stop

    @tf.function
    def train_step(iterator, stop):
        images, labels = next(iterator)
        outputs = strategy.run(step_fn, args=(images, labels, stop))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None) for x in outputs]

    @tf.function
    def eval_step(images, labels):
        logits = model(images, training=False)
        per_example = optim.per_example_loss(labels, logits, num_classes, 0.0)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(per_example), correct

    def save(step: int) -> str:
        path = manager.save(checkpoint_number=step)
        if cluster.is_chief:
            atomic_write_json(history_path, history)
            _write_steps(steps_path, step_rows)
        return path

    prep = Preprocess.from_train(cfg)
    val_ds = make_dataset(val_files, gbs, prep, training=False)
    step = int(step_var.numpy())
    verbose = (1 if _interactive() else 2) if cluster.is_chief else 0
    try:
        with _SigtermWatcher() as sigterm, writer.as_default():
            while step < total_steps:
                epoch, done_in_epoch = divmod(step, steps_per_epoch)

                def dataset_fn(ctx: tf.distribute.InputContext, epoch=epoch, skip=done_in_epoch):
                    return make_dataset(train_files, ctx.get_per_replica_batch_size(gbs), prep, training=True,
                                        seed=seed + epoch, input_context=ctx, skip_batches=skip,
                                        split_global_batch=cfg.deterministic)

                iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
                if cluster.is_chief:
                    print(f"Epoch {epoch + 1}/{cfg.epochs}", flush=True)
                bar = keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "accuracy", "img/s"], verbose=verbose)
                clock = time.perf_counter()
                for i in range(done_in_epoch, steps_per_epoch):
                    lr = float(schedule(step))
                    loss, correct, stop = train_step(iterator, tf.constant(1.0 if sigterm.requested else 0.0))
                    step += 1
                    loss, correct = float(loss), float(correct)
                    now = time.perf_counter()
                    sums["epoch_loss"].assign_add(loss)
                    sums["epoch_correct"].assign_add(correct)
                    sums["epoch_seen"].assign_add(gbs)
                    sums["epoch_seconds"].assign_add(now - clock)
                    sums["run_images"].assign_add(gbs)
                    sums["run_seconds"].assign_add(now - clock)
                    clock = now
                    step_var.assign(step)
                    seen = float(sums["epoch_seen"].numpy())
                    rate = seen / max(float(sums["epoch_seconds"].numpy()), 1e-9)
                    step_rows.append({"step": step, "loss": loss / gbs, "accuracy": correct / gbs, "lr": lr})
                    bar.update(i + 1, [("loss", float(sums["epoch_loss"].numpy()) / seen),
                                       ("accuracy", float(sums["epoch_correct"].numpy()) / seen), ("img/s", rate)])
                    if step % cfg.summary_every_steps == 0:
                        tf.summary.scalar("train/loss", loss / gbs, step=step)
                        tf.summary.scalar("train/accuracy", correct / gbs, step=step)
                        tf.summary.scalar("train/lr", lr, step=step)
                        tf.summary.scalar("train/images_per_sec", rate, step=step)
                    if float(stop) > 0:
                        path = save(step)
                        raise Preempted(step, path if cluster.is_chief else str(run_dir))
                    if step % cfg.checkpoint_every_steps == 0 and step % steps_per_epoch:
                        save(step)
                seen = float(sums["epoch_seen"].numpy())
                val_loss = val_correct = 0.0
                for images, labels in val_ds:
                    vl, vc = eval_step(images, labels)
                    val_loss, val_correct = val_loss + float(vl), val_correct + float(vc)
                history.append({
                    "epoch": epoch, "step": step, "lr": float(schedule(step)),
                    "train_loss": float(sums["epoch_loss"].numpy()) / seen,
                    "train_accuracy": float(sums["epoch_correct"].numpy()) / seen,
                    "val_loss": val_loss / n_val, "val_accuracy": val_correct / n_val,
                    "images_per_sec": seen / max(float(sums["epoch_seconds"].numpy()), 1e-9),
                })
                for name in ("loss", "accuracy"):
                    tf.summary.scalar(f"val/{name}", history[-1][f"val_{name}"], step=step)
                log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in history[-1].items()})
                for name in ("epoch_loss", "epoch_correct", "epoch_seen", "epoch_seconds"):
                    sums[name].assign(0.0)
                save(step)
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
            tf.errors.InternalError) as err:
        if cluster.workers <= 1:
            raise
        first = str(err).strip().splitlines()[0]
        raise WorkerFailed(f"{cluster.name}: a collective operation failed at step {step + 1} ({first}); "
                           f"another worker died or is unreachable; restart all workers to resume from "
                           f"{tf.train.latest_checkpoint(str(run_dir))}") from None
    finally:
        writer.flush()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    images, seconds = float(sums["run_images"].numpy()), float(sums["run_seconds"].numpy())
    summary = {
        "steps": step, "epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch,
        "global_batch_size": gbs, "replicas": replicas, "workers": cluster.workers,
        "strategy": _strategy_name(strategy), "precision": cfg.precision, "jit_compile": cfg.jit_compile,
        "wall_time_sec": round(seconds, 3),
        "images_per_sec": round(images / seconds, 2) if seconds > 0 else None,
        "final": history[-1] if history else None,
        "data": trained_on(shards_dir),
    }
    if cluster.is_chief:
        _write_model_dir(model, full_config, history, summary, classes, model_dir, step_rows)
    return summary


def _strategy_name(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):  # its class is CollectiveAllReduceStrategy
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def _read_steps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "accuracy": float(r["accuracy"]), "lr": float(r["lr"])}
                for r in csv.DictReader(f)]


def _write_steps(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _interactive() -> bool:
    import sys

    return sys.stdout.isatty()


def _write_model_dir(model, full_config: Config, history, summary, classes, model_dir: Path, step_rows=()) -> None:
    """model.keras, the SavedModel, the resolved config, history.csv, steps.csv, curves.png and
    train.json, swapped in as a whole."""
    with staged_dir(model_dir) as tmp:
        with recursion_limit():  # ResNet-1202's graph is deeper than Python's default limit
            model.save(tmp / "model.keras")
        from resnet_pipeline.export import export_saved_model  # the SavedModel for serving
        export_saved_model(model, classes, Preprocess.from_train(full_config.train), tmp / "saved_model",
                           top_k=full_config.evaluate.top_k)
        (tmp / "config.yaml").write_text(full_config.to_yaml())
        atomic_write_json(tmp / "labels.json", {"classes": classes})
        atomic_write_json(tmp / "train.json", summary)
        with open(tmp / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
        _write_steps(tmp / "steps.csv", list(step_rows))
        from resnet_pipeline.training.curves import plot_curves

        plot_curves(history, tmp / "curves.png", title=f"{model.name} ({summary['strategy']})")
