"""Train stage: a custom training loop over tf.distribute that survives being killed.

    resnet-pipeline train [--set train.strategy=mirrored] [--workers N]

As Model Garden's `resnet_ctl_imagenet_main`: the strategy is created first, the model and
optimizer are built inside `strategy.scope()`, the data comes from
`strategy.distribute_datasets_from_function` with a per-replica batch of
`global_batch_size / replicas`, the step is a `tf.function` around `strategy.run`, the loss is
averaged over the global batch and weight decay is scaled by the number of replicas. `model.fit`
is not used (it fails under MultiWorkerMirroredStrategy with Keras 3, keras-team/keras#20585).

State (model, optimizer, step, the epoch's running sums) is saved with
`tf.train.CheckpointManager` every `checkpoint_every_steps` steps, at the end of fine-tuning's
head phase and after the last step, in a
folder keyed by the run's fingerprint (the params that change the result, the seed and the data).
A rerun resumes from the last checkpoint: the lr schedule follows the restored step, the epoch's
data order is replayed and the batches already trained are skipped, so no step is trained twice
or skipped. SIGTERM (how preemption arrives) is noted, agreed on by all workers within the step,
and answered by a checkpoint at that step and `Preempted`.
"""

from __future__ import annotations

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
from resnet_pipeline.data.pipeline import Preprocess, decode_in_memory, make_dataset, shard_files, train_epochs
from resnet_pipeline.data.shard import INDEX
from resnet_pipeline.fileio import atomic_write_json, read_json, sha256_file
from resnet_pipeline.training import records
from resnet_pipeline.training.preempt import Preempted  # noqa: F401  (raised here, caught by callers)
from resnet_pipeline.training.strategy import Cluster, make_strategy
from resnet_pipeline.training.trainer import Trainer

log = logging.getLogger(__name__)

VAL_IN_MEMORY_BYTES = 256 * 2**20  # float32 images of the val split kept in memory when they fit
# params that do not change what is trained: a run resumes across changes of these
NOT_IN_FINGERPRINT = (
    "checkpoint_every_steps",
    "keep_checkpoints",
    "summary_every_steps",
    "validate_every_epochs",
    "export",
)


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
    return {
        "index_sha256": sha256_file(shards_dir / INDEX),
        "shard_key": index.get("stage_key") if isinstance(index, dict) else None,
    }


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
    registry=None,
) -> dict:
    """Train on the train shards, validate on val every `validate_every_epochs`, write `model_dir`;
    return the summary.

    Creates the strategy of `cfg.strategy` unless one is given (with its `cluster`); raises
    `Preempted` after saving when SIGTERM arrives, `WorkerFailed` when another worker dies.
    `registry` is where a `train.init` registry spec is fetched from.
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
    trainer = Trainer(cfg, strategy, len(classes), steps_per_epoch, registry=registry)
    trainer.build()
    run_dir = checkpoint_root / run_fingerprint(cfg, seed, shards_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # MultiWorkerMirroredStrategy: every worker saves (saving is collective); only the chief keeps it
    scratch = None if cluster.is_chief else Path(tempfile.mkdtemp(prefix=f"resnet-{cluster.name}-"))
    trainer.manage(scratch or run_dir, cfg.keep_checkpoints)
    history_path, steps_path = run_dir / "history.json", run_dir / "steps.csv"
    history: list[dict] = []
    step_rows: list[dict] = []
    latest = trainer.restore(run_dir)
    step = int(trainer.step.numpy())
    sums = {k: float(v.numpy()) for k, v in trainer.sums.items()}
    if latest:
        history = (
            [h for h in read_json(history_path, "history") if h["epoch"] < step // steps_per_epoch]
            if history_path.exists()
            else []
        )
        step_rows = [r for r in records.read_steps(steps_path) if r["step"] <= step]
        log.info("train: resuming from %s at step %d of %d", latest, step, total_steps)
    else:
        log.info(
            "train: starting %s, %d steps (%d epochs x %d), global batch %d over %d replica(s)",
            trainer.model.name,
            total_steps,
            cfg.epochs,
            steps_per_epoch,
            gbs,
            replicas,
        )
    writer = (
        tf.summary.create_file_writer(str(Path(tensorboard_root) / run_dir.name))
        if tensorboard_root and cluster.is_chief
        else tf.summary.create_noop_writer()
    )

    def save(at: int) -> str:
        began = time.perf_counter()
        path = trainer.save(at, sums)
        if cluster.is_chief:
            atomic_write_json(history_path, history)
            records.write_steps(steps_path, step_rows)
        timing["checkpoints"] += time.perf_counter() - began
        return path

    prep = Preprocess.from_train(cfg)
    val_ds = make_dataset(val_files, gbs, prep, training=False)
    in_memory = decode_in_memory(train_files, n_train, prep)
    if in_memory is not None:
        log.info(
            "train: the %d train images are decoded once and kept in memory (%.1f MB)", n_train, in_memory.nbytes / 1e6
        )
    if n_val and _val_in_memory(n_val, cfg):
        trainer.hold_validation(val_ds)
    verbose = (1 if _interactive() else 2) if cluster.is_chief else 0
    start, cpu_start = time.perf_counter(), time.process_time()
    # the first chunk traces the step; the seconds of the loop spent validating and checkpointing
    timing: dict[str, float] = {"first": -1.0, "first_images": 0, "loop": 0.0, "validation": 0.0, "checkpoints": 0.0}
    try:
        with _SigtermWatcher() as sigterm, writer.as_default():
            if step < total_steps:  # (a run restored at its last step trains nothing)
                iterator = _train_iterator(strategy, train_files, in_memory, prep, cfg, seed, step, steps_per_epoch)
            while step < total_steps:
                epoch = step // steps_per_epoch
                trainer.enter_epoch(epoch)  # the head phase of fine-tuning ends at an epoch boundary
                if cluster.is_chief:
                    print(f"Epoch {epoch + 1}/{cfg.epochs}", flush=True)
                bar = keras.utils.Progbar(
                    steps_per_epoch, stateful_metrics=["loss", "accuracy", "img/s"], verbose=verbose
                )
                clock = time.perf_counter()
                while step < (epoch + 1) * steps_per_epoch:
                    n = _steps_to_next_stop(step, steps_per_epoch, cfg)
                    lr = float(trainer.schedule(step))
                    loss, correct, stop = trainer.train_steps(iterator, n, sigterm.requested)
                    step += n
                    now = time.perf_counter()
                    for name, value in (
                        ("epoch_loss", loss),
                        ("epoch_correct", correct),
                        ("epoch_seen", n * gbs),
                        ("epoch_seconds", now - clock),
                        ("run_images", n * gbs),
                        ("run_seconds", now - clock),
                    ):
                        sums[name] += value
                    clock = now
                    if timing["first"] < 0:
                        timing["first"], timing["first_images"] = now - start, n * gbs
                        timing["first_cpu"] = time.process_time() - cpu_start
                    rate = sums["epoch_seen"] / max(sums["epoch_seconds"], 1e-9)
                    step_rows.append(
                        {"step": step, "loss": loss / (n * gbs), "accuracy": correct / (n * gbs), "lr": lr}
                    )
                    bar.update(
                        step - epoch * steps_per_epoch,
                        [
                            ("loss", sums["epoch_loss"] / sums["epoch_seen"]),
                            ("accuracy", sums["epoch_correct"] / sums["epoch_seen"]),
                            ("img/s", rate),
                        ],
                    )
                    if step % cfg.summary_every_steps == 0 or n < cfg.summary_every_steps:
                        for name, value in (
                            ("loss", loss / (n * gbs)),
                            ("accuracy", correct / (n * gbs)),
                            ("lr", lr),
                            ("images_per_sec", rate),
                        ):
                            tf.summary.scalar(f"train/{name}", value, step=step)
                    if stop:
                        path = save(step)
                        raise Preempted(step, path if cluster.is_chief else str(run_dir))
                    if step % cfg.checkpoint_every_steps == 0 and step % steps_per_epoch:
                        save(step)
                began = time.perf_counter()
                history.append(_epoch_record(trainer, epoch, step, sums, val_ds, n_val, cfg, run_dir, cluster))
                timing["validation"] += time.perf_counter() - began
                log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in history[-1].items() if v is not None})
                for name in ("epoch_loss", "epoch_correct", "epoch_seen", "epoch_seconds"):
                    sums[name] = 0.0
                # and at the last step of fine-tuning's head phase, where what is trained changes
                phase_ends = trainer.tuner.phase_of(epoch) != trainer.tuner.phase_of(epoch + 1)
                if step % cfg.checkpoint_every_steps == 0 or step == total_steps or phase_ends:
                    save(step)
        timing["loop"], timing["loop_cpu"] = time.perf_counter() - start, time.process_time() - cpu_start
    except (
        tf.errors.UnavailableError,
        tf.errors.AbortedError,
        tf.errors.DeadlineExceededError,
        tf.errors.InternalError,
    ) as err:
        if cluster.workers <= 1:
            raise
        first = str(err).strip().splitlines()[0]
        raise WorkerFailed(
            f"{cluster.name}: a collective operation failed at step {step + 1} ({first}); "
            f"another worker died or is unreachable; restart all workers to resume from "
            f"{tf.train.latest_checkpoint(str(run_dir))}"
        ) from None
    finally:
        writer.flush()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    images, seconds = sums["run_images"], sums["run_seconds"]
    summary = {
        "steps": step,
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "global_batch_size": gbs,
        "replicas": replicas,
        "workers": cluster.workers,
        "strategy": _strategy_name(strategy),
        "precision": cfg.precision,
        "jit_compile": cfg.jit_compile,
        "wall_time_sec": round(seconds, 3),
        "images_per_sec": round(images / seconds, 2) if seconds > 0 else None,
        "exported": cfg.export,
        "ema_decay": cfg.ema_decay,
        # the epochs' wall time with validation and checkpoints, and its first chunk (tracing included)
        "loop_seconds": round(timing["loop"], 3),
        "first_chunk_seconds": round(max(timing["first"], 0.0), 3),
        "first_chunk_images": int(timing["first_images"]),
        # the process's CPU seconds over the same spans: a figure that other load on the machine moves less
        "loop_cpu_seconds": round(timing.get("loop_cpu", 0.0), 3),
        "first_chunk_cpu_seconds": round(timing.get("first_cpu", 0.0), 3),
        "validation_seconds": round(timing["validation"], 3),
        "checkpoint_seconds": round(timing["checkpoints"], 3),
        "best_val_accuracy": float(trainer.best_val.numpy()) if float(trainer.best_val.numpy()) >= 0 else None,
        "final": history[-1] if history else None,
        "data": trained_on(shards_dir),
    }
    if cluster.is_chief:
        trainer.finalize(run_dir)
        records.write_model_dir(
            trainer.model,
            full_config,
            history,
            summary,
            classes,
            model_dir,
            step_rows,
            {"init": trainer.init_record, "finetune": trainer.tuner.describe()},
        )
    return summary


def _val_in_memory(n_val: int, cfg: TrainConfig) -> bool:
    """Whether the val split's float32 images fit in VAL_IN_MEMORY_BYTES (then decoded once, at start-up)."""
    return n_val * cfg.image_size**2 * 3 * 4 <= VAL_IN_MEMORY_BYTES


def _train_iterator(
    strategy, train_files, in_memory, prep, cfg: TrainConfig, seed: int, step: int, steps_per_epoch: int
):
    """One iterator over the rest of the run's epochs (`pipeline.train_epochs`), from `step` on."""
    first_epoch, done_in_epoch = divmod(step, steps_per_epoch)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return train_epochs(
            train_files,
            ctx.get_per_replica_batch_size(cfg.global_batch_size),
            prep,
            seed=seed,
            first_epoch=first_epoch,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            skip_batches=done_in_epoch,
            input_context=ctx,
            split_global_batch=cfg.deterministic,
            in_memory=in_memory,
        )

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def _steps_to_next_stop(step: int, steps_per_epoch: int, cfg: TrainConfig) -> int:
    """Steps to run on the device before the host looks again: up to the next summary, checkpoint or
    epoch end, whichever comes first."""
    epoch_end = (step // steps_per_epoch + 1) * steps_per_epoch
    marks = [epoch_end]
    for every in (cfg.summary_every_steps, cfg.checkpoint_every_steps):
        marks.append((step // every + 1) * every)
    return max(1, min(marks) - step)


def _epoch_record(
    trainer: Trainer,
    epoch: int,
    step: int,
    sums: dict,
    val_ds,
    n_val: int,
    cfg: TrainConfig,
    run_dir: Path,
    cluster: Cluster,
) -> dict:
    """The epoch's row of history.csv; validation only every `validate_every_epochs` and at the end."""
    seen = sums["epoch_seen"]
    record = {
        "epoch": epoch,
        "step": step,
        "lr": float(trainer.schedule(step)),
        "train_loss": sums["epoch_loss"] / seen,
        "train_accuracy": sums["epoch_correct"] / seen,
        "val_loss": None,
        "val_accuracy": None,
        "images_per_sec": seen / max(sums["epoch_seconds"], 1e-9),
    }
    last = epoch + 1 == cfg.epochs
    if n_val and ((epoch + 1) % cfg.validate_every_epochs == 0 or last):
        val_loss, val_correct = trainer.validate(val_ds)
        record.update(val_loss=val_loss / n_val, val_accuracy=val_correct / n_val)
        for name in ("loss", "accuracy"):
            tf.summary.scalar(f"val/{name}", record[f"val_{name}"], step=step)
        trainer.keep_if_best(record["val_accuracy"], run_dir, cluster.is_chief)
    return record


def _strategy_name(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):  # its class is CollectiveAllReduceStrategy
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def _interactive() -> bool:
    import sys

    return sys.stdout.isatty()
