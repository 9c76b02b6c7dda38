"""One training run, step by step: the state the host keeps between the chunks of steps the
device runs (step, epoch sums, history, step rows, timings), and what happens at each chunk's and
each epoch's end. `loop.train` is its driver.
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

from resnet_pipeline.config import TrainConfig
from resnet_pipeline.data.contracts import INDEX
from resnet_pipeline.data.pipeline import Preprocess, decode_in_memory, make_dataset, shard_files, train_epochs
from resnet_pipeline.fileio import atomic_write_json, read_json, sha256_file
from resnet_pipeline.training import records
from resnet_pipeline.training.preempt import Preempted
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


class Run:
    """One call of `train`: the data, the trainer and the host's running state of the loop (step,
    epoch sums, history, step rows, timings)."""

    def __init__(self, cfg, full_config, shards_dir, labels_path, strategy, cluster, fetch_init):
        if strategy is None:
            strategy, cluster = make_strategy(cfg.strategy, cfg.cpu_devices)
        self.cfg, self.full_config, self.shards_dir = cfg, full_config, shards_dir
        self.strategy, self.cluster, self.seed = strategy, cluster or Cluster(), full_config.base.seed
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.classes = read_json(labels_path, "labels")["classes"]
        self.train_files, self.n_train = shard_files(shards_dir, "train")
        self.val_files, self.n_val = shard_files(shards_dir, "val")
        gbs, replicas = cfg.global_batch_size, strategy.num_replicas_in_sync
        self.steps_per_epoch = self.n_train // gbs
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.global_batch_size: received {gbs}; the train split has only {self.n_train} images")
        if gbs % replicas:
            raise ValueError(f"train.global_batch_size: received {gbs}; must be a multiple of the {replicas} replicas")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        keras.utils.set_random_seed(self.seed)
        self.trainer = Trainer(cfg, strategy, len(self.classes), self.steps_per_epoch, fetch_init=fetch_init)
        self.trainer.build()
        self.history: list[dict] = []
        self.step_rows: list[dict] = []
        # the first chunk traces the step; the seconds of the loop spent validating and checkpointing
        self.timing: dict[str, float] = {"first": -1.0, "first_images": 0, "loop": 0.0, "validation": 0.0}
        self.timing["checkpoints"] = self.timing["steps"] = 0.0

    # ------------------------------------------------------------------------------ before the loop

    def restore(self, checkpoint_root: Path, tensorboard_root) -> None:
        """The run's checkpoint folder (keyed by its fingerprint), its last checkpoint if any, the
        TensorBoard writer and the input: the train split and the val split, held in memory when small."""
        cfg, trainer, cluster = self.cfg, self.trainer, self.cluster
        self.run_dir = checkpoint_root / run_fingerprint(cfg, self.seed, self.shards_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # MultiWorkerMirroredStrategy: every worker saves (saving is collective); only the chief keeps it
        self.scratch = None if cluster.is_chief else Path(tempfile.mkdtemp(prefix=f"resnet-{cluster.name}-"))
        trainer.manage(self.scratch or self.run_dir, cfg.keep_checkpoints)
        self.history_path, self.steps_path = self.run_dir / "history.json", self.run_dir / "steps.csv"
        latest = trainer.restore(self.run_dir)
        self.step = int(trainer.step.numpy())
        self.sums = {k: float(v.numpy()) for k, v in trainer.sums.items()}
        if latest:
            if self.history_path.exists():
                done = self.step // self.steps_per_epoch
                self.history = [h for h in read_json(self.history_path, "history") if h["epoch"] < done]
            self.step_rows = [r for r in records.read_steps(self.steps_path) if r["step"] <= self.step]
            log.info("train: resuming from %s at step %d of %d", latest, self.step, self.total_steps)
        else:
            log.info(
                "train: starting %s, %d steps (%d epochs x %d), global batch %d over %d replica(s)",
                trainer.model.name,
                self.total_steps,
                cfg.epochs,
                self.steps_per_epoch,
                cfg.global_batch_size,
                self.strategy.num_replicas_in_sync,
            )
        self.writer = (
            tf.summary.create_file_writer(str(Path(tensorboard_root) / self.run_dir.name))
            if tensorboard_root and cluster.is_chief
            else tf.summary.create_noop_writer()
        )
        # the first scalar imports TensorBoard's summary modules (about 0.6 s): at start-up, not in
        # the middle of the first epoch; a no-op writer records nothing
        with tf.summary.create_noop_writer().as_default():
            tf.summary.scalar("start-up", 0.0, step=0)
        self.prep = Preprocess.from_train(cfg)
        self.val_ds = make_dataset(self.val_files, cfg.global_batch_size, self.prep, training=False)
        self.in_memory = decode_in_memory(self.train_files, self.n_train, self.prep)
        if self.in_memory is not None:
            log.info(
                "train: the %d train images are decoded once and kept in memory (%.1f MB)",
                self.n_train,
                self.in_memory.nbytes / 1e6,
            )
        if self.n_val and _val_in_memory(self.n_val, cfg):
            trainer.hold_validation(self.val_ds)

    # ------------------------------------------------------------------------------ the loop

    def train(self) -> None:
        """The epochs left, one iterator for all; a collective failure becomes `WorkerFailed`."""
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        try:
            with _SigtermWatcher() as sigterm, self.writer.as_default():
                if self.step < self.total_steps:  # (a run restored at its last step trains nothing)
                    iterator = _train_iterator(
                        self.strategy,
                        self.train_files,
                        self.in_memory,
                        self.prep,
                        self.cfg,
                        self.seed,
                        self.step,
                        self.steps_per_epoch,
                    )
                while self.step < self.total_steps:
                    self._epoch(iterator, sigterm)
            self.timing["loop"] = time.perf_counter() - self.start
            self.timing["loop_cpu"] = time.process_time() - self.cpu_start
        except (
            tf.errors.UnavailableError,
            tf.errors.AbortedError,
            tf.errors.DeadlineExceededError,
            tf.errors.InternalError,
        ) as err:
            if self.cluster.workers <= 1:
                raise
            first = str(err).strip().splitlines()[0]
            raise WorkerFailed(
                f"{self.cluster.name}: a collective operation failed at step {self.step + 1} ({first}); "
                f"another worker died or is unreachable; restart all workers to resume from "
                f"{tf.train.latest_checkpoint(str(self.run_dir))}"
            ) from None
        finally:
            self.writer.flush()
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _epoch(self, iterator, sigterm: _SigtermWatcher) -> None:
        """The rest of this epoch in chunks, then its record and, on the cadence, a checkpoint."""
        cfg, spe = self.cfg, self.steps_per_epoch
        epoch = self.step // spe
        self.trainer.enter_epoch(epoch)  # the head phase of fine-tuning ends at an epoch boundary
        if self.cluster.is_chief:
            print(f"Epoch {epoch + 1}/{cfg.epochs}", flush=True)
        verbose = (1 if _interactive() else 2) if self.cluster.is_chief else 0
        bar = keras.utils.Progbar(spe, stateful_metrics=["loss", "accuracy", "img/s"], verbose=verbose)
        self.clock = time.perf_counter()
        while self.step < (epoch + 1) * spe:
            self._chunk(iterator, sigterm, epoch, bar)
        began = time.perf_counter()
        self.history.append(
            _epoch_record(
                self.trainer, epoch, self.step, self.sums, self.val_ds, self.n_val, cfg, self.run_dir, self.cluster
            )
        )
        self.timing["validation"] += time.perf_counter() - began
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in self.history[-1].items() if v is not None})
        for name in ("epoch_loss", "epoch_correct", "epoch_seen", "epoch_seconds"):
            self.sums[name] = 0.0
        # and at the last step of fine-tuning's head phase, where what is trained changes
        tuner = self.trainer.tuner
        phase_ends = tuner.phase_of(epoch) != tuner.phase_of(epoch + 1)
        if self.step % cfg.checkpoint_every_steps == 0 or self.step == self.total_steps or phase_ends:
            self.save()

    def _chunk(self, iterator, sigterm: _SigtermWatcher, epoch: int, bar) -> None:
        """Steps up to the next summary, checkpoint or epoch end on the device; then the host's
        figures, progress, TensorBoard, and a checkpoint when one is due or SIGTERM came."""
        cfg, gbs = self.cfg, self.cfg.global_batch_size
        n = _steps_to_next_stop(self.step, self.steps_per_epoch, cfg)
        lr = float(self.trainer.schedule(self.step))
        began = time.perf_counter()
        loss, correct, stop = self.trainer.train_steps(iterator, n, sigterm.requested)
        self.step += n
        now = time.perf_counter()
        if self.timing["first"] >= 0:  # the device's steps after the first chunk (tracing)
            self.timing["steps"] += now - began
        images, seconds = n * gbs, now - self.clock
        for name, value in (
            ("epoch_loss", loss),
            ("epoch_correct", correct),
            ("epoch_seen", images),
            ("epoch_seconds", seconds),
            ("run_images", images),
            ("run_seconds", seconds),
        ):
            self.sums[name] += value
        self.clock = now
        if self.timing["first"] < 0:
            self.timing["first"], self.timing["first_images"] = now - self.start, images
            self.timing["first_cpu"] = time.process_time() - self.cpu_start
        sums = self.sums
        rate = sums["epoch_seen"] / max(sums["epoch_seconds"], 1e-9)
        self.step_rows.append({"step": self.step, "loss": loss / images, "accuracy": correct / images, "lr": lr})
        bar.update(
            self.step - epoch * self.steps_per_epoch,
            [
                ("loss", sums["epoch_loss"] / sums["epoch_seen"]),
                ("accuracy", sums["epoch_correct"] / sums["epoch_seen"]),
                ("img/s", rate),
            ],
        )
        if self.step % cfg.summary_every_steps == 0 or n < cfg.summary_every_steps:
            for name, value in (("loss", loss / images), ("accuracy", correct / images), ("lr", lr)):
                tf.summary.scalar(f"train/{name}", value, step=self.step)
            tf.summary.scalar("train/images_per_sec", rate, step=self.step)
        if stop:
            path = self.save()
            raise Preempted(self.step, path if self.cluster.is_chief else str(self.run_dir))
        if self.step % cfg.checkpoint_every_steps == 0 and self.step % self.steps_per_epoch:
            self.save()

    def save(self) -> str:
        """A checkpoint at this step, with history.json and steps.csv beside it (the chief's)."""
        began = time.perf_counter()
        path = self.trainer.save(self.step, self.sums)
        if self.cluster.is_chief:
            atomic_write_json(self.history_path, self.history)
            records.write_steps(self.steps_path, self.step_rows)
        self.timing["checkpoints"] += time.perf_counter() - began
        return path

    # ------------------------------------------------------------------------------ after the loop

    def summary(self) -> dict:
        """train.json: what was trained, how fast, the last epoch's record and the data."""
        cfg, timing, best = self.cfg, self.timing, float(self.trainer.best_val.numpy())
        images, seconds = self.sums["run_images"], self.sums["run_seconds"]
        return {
            "steps": self.step,
            "epochs": cfg.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch_size": cfg.global_batch_size,
            "replicas": self.strategy.num_replicas_in_sync,
            "workers": self.cluster.workers,
            "strategy": _strategy_name(self.strategy),
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
            "steps_seconds": round(timing["steps"], 3),  # inside the compiled steps, after the first chunk
            "validation_seconds": round(timing["validation"], 3),
            "checkpoint_seconds": round(timing["checkpoints"], 3),
            "best_val_accuracy": best if best >= 0 else None,
            "final": self.history[-1] if self.history else None,
            "data": trained_on(self.shards_dir),
        }

    def export(self, model_dir: Path, summary: dict, saved_model: bool = True) -> None:
        """The weights `train.export` names, written with the run's records into `model_dir`
        (with their SavedModel unless `saved_model` is false)."""
        self.trainer.finalize(self.run_dir)
        records.write_model_dir(
            self.trainer.model,
            self.full_config,
            self.history,
            summary,
            self.classes,
            model_dir,
            self.step_rows,
            {"init": self.trainer.init_record, "finetune": self.trainer.tuner.describe()},
            saved_model=saved_model,
        )


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
