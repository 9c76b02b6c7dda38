"""The trainer: small verbs over one model, optimizer and strategy, in the way Model Garden's
`ResnetRunnable` reads. The driver in `loop.py` decides *when* to call them.

    trainer = Trainer(cfg, strategy, num_classes, steps_per_epoch)
    trainer.build()                        # model and optimizer inside strategy.scope()
    step = trainer.restore(run_dir)        # from the last checkpoint, if any
    loss, correct, stop = trainer.train_steps(iterator, n, stop)   # n steps on the device, one read back
    val_loss, val_correct = trainer.validate(val_dataset)          # the whole split on the device
    trainer.save(step)

Figures stay on the device: `train_steps` runs `n` steps in one `tf.function` (a `tf.range` loop
around `strategy.run`) and returns their sums, so the host reads three numbers per `n` steps
instead of several per step. With `train.ema_decay` the trainer keeps an exponential moving
average of every weight (BN statistics included); validation and export then use it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import keras
import tensorflow as tf

from resnet_pipeline.config import TrainConfig
from resnet_pipeline.models.resnet import build_resnet, model_arguments
from resnet_pipeline.training import finetune, optim
from resnet_pipeline.training.init import init_cache_dir, load_initial_weights

log = logging.getLogger(__name__)

SUMS = ("epoch_loss", "epoch_correct", "epoch_seen", "epoch_seconds", "run_images", "run_seconds")
BEST_WEIGHTS = "best.weights.h5"


def set_precision(precision: str) -> None:
    keras.mixed_precision.set_global_policy("float32" if precision == "float32" else precision)


class Trainer:
    """One training run's model, optimizer, EMA and checkpointed state."""

    def __init__(
        self,
        cfg: TrainConfig,
        strategy: tf.distribute.Strategy,
        num_classes: int,
        steps_per_epoch: int,
        fetch_init=None,
    ):
        self.cfg, self.strategy, self.num_classes, self.fetch_init = cfg, strategy, num_classes, fetch_init
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = cfg.global_batch_size
        self.schedule = optim.make_schedule(cfg, steps_per_epoch)

    # ------------------------------------------------------------------------------ build and restore

    def build(self) -> None:
        """Model, optimizer and EMA inside `strategy.scope()`; the checkpointed state beside them."""
        cfg = self.cfg
        set_precision(cfg.precision)
        try:
            with self.strategy.scope():
                self.model = build_resnet(**model_arguments(cfg, num_classes=self.num_classes))
                self.init_record = load_initial_weights(
                    self.model, cfg, cache_dir=init_cache_dir(), fetch_init=self.fetch_init
                )
                self.tuner = finetune.FineTune(self.model, cfg)  # before the optimizer: it covers every phase
                self.optimizer = optim.make_optimizer(cfg, self.schedule)
                self.optimizer.build(self.model.trainable_variables)
                self.averaged = [v for v in self.model.weights if "float" in str(v.dtype)] if cfg.ema_decay else []
                self.ema = [
                    tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"ema_{i}")
                    for i, v in enumerate(self.averaged)
                ]
        finally:
            set_precision("float32")  # the policy is global: leave it as found
        self.decayed = optim.decayed_variables(self.model, cfg.decay_bn_and_bias) if cfg.weight_decay else []
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.best_val = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_accuracy")
        self.sums = {k: tf.Variable(0.0, dtype=tf.float64, trainable=False, name=k) for k in SUMS}
        state = {f"ema_{i}": v for i, v in enumerate(self.ema)}
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, step=self.step, best_val=self.best_val, **self.sums, **state
        )
        self._trace()
        self._validate = tf.function(self._validate_fn)
        size = cfg.image_size
        self._validate_tensors = tf.function(
            self._validate_tensors_fn,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None], tf.int32)],
        )
        self._val_tensors: tuple[tf.Tensor, ...] | None = None

    def _trace(self) -> None:
        """(Re)make the compiled step: the variables it trains are fixed when it is traced."""
        self._grad_fn = tf.function(self._gradients, jit_compile=True) if self.cfg.jit_compile else self._gradients
        self._train_steps = tf.function(self._train_steps_fn)

    def enter_epoch(self, epoch: int) -> None:
        """Switch the fine-tuning phase (head only, then everything) when `epoch` starts another one."""
        if self.tuner.enter(epoch):
            self._trace()

    def manage(self, directory: Path, keep: int) -> None:
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=keep)

    def restore(self, run_dir: Path) -> str | None:
        """Restore the last checkpoint of `run_dir`; return its path (None: a fresh start)."""
        latest = tf.train.latest_checkpoint(str(run_dir))
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def save(self, step: int, host_sums: dict[str, float]) -> str:
        """A checkpoint numbered `step`, with the run's sums as the host has them."""
        self.step.assign(step)
        for name, value in host_sums.items():
            self.sums[name].assign(value)
        return self.manager.save(checkpoint_number=step)

    # ------------------------------------------------------------------------------ steps

    def _gradients(self, images, labels):
        cfg, model = self.cfg, self.model
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = optim.per_example_loss(labels, logits, self.num_classes, cfg.label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if self.decayed:
                loss += tf.nn.scale_regularization_loss(optim.weight_decay_loss(self.decayed, cfg.weight_decay))
            scaled = (
                self.optimizer.scale_loss(loss)
                if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
                else loss
            )
        grads = tape.gradient(scaled, model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return grads, tf.reduce_sum(per_example), correct

    def _replica_step(self, images, labels, stop):
        grads, loss_sum, correct = self._grad_fn(images, labels)
        grads = self.tuner.scale(grads, self.model.trainable_variables)  # the head's lr multiplier
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss_sum, correct, tf.identity(stop)  # summed over replicas: did any worker get told to stop

    def _update_ema(self) -> None:
        # the decay ramps up over the first steps (as tf.train.ExponentialMovingAverage with num_updates)
        n = tf.cast(self.optimizer.iterations, tf.float32)
        decay = tf.minimum(tf.constant(self.cfg.ema_decay, tf.float32), (1.0 + n) / (10.0 + n))
        for average, weight in zip(self.ema, self.averaged):
            average.assign(decay * average + (1.0 - decay) * tf.cast(weight, average.dtype))

    def _train_steps_fn(self, iterator, steps, stop):
        totals = [tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)]
        for _ in tf.range(steps):
            images, labels = next(iterator)
            outputs = self.strategy.run(self._replica_step, args=(images, labels, stop))
            reduced = [self.strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None) for x in outputs]
            totals = [t + r for t, r in zip(totals, reduced)]
            if self.ema:
                self._update_ema()
        return totals

    def train_steps(self, iterator, steps: int, stop: bool) -> tuple[float, float, bool]:
        """Train `steps` steps; (summed loss, correct predictions, whether any worker asked to stop)."""
        loss, correct, stopped = self._train_steps(
            iterator, tf.constant(steps, tf.int64), tf.constant(1.0 if stop else 0.0)
        )
        return float(loss), float(correct), float(stopped) > 0

    def _eval_batch(self, images, labels):
        logits = self.model(images, training=False)
        loss = tf.reduce_sum(optim.per_example_loss(labels, logits, self.num_classes, 0.0))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return loss, correct

    def _validate_fn(self, dataset):
        loss, correct = tf.constant(0.0), tf.constant(0.0)
        for images, labels in dataset:
            batch_loss, batch_correct = self._eval_batch(images, labels)
            loss, correct = loss + batch_loss, correct + batch_correct
        return loss, correct

    def _validate_tensors_fn(self, images, labels):
        n, size = tf.shape(images)[0], self.global_batch_size
        loss, correct = tf.constant(0.0), tf.constant(0.0)
        for start in tf.range(0, n, size):
            end = tf.minimum(start + size, n)
            batch_loss, batch_correct = self._eval_batch(images[start:end], labels[start:end])
            loss, correct = loss + batch_loss, correct + batch_correct
        return loss, correct

    def hold_validation(self, dataset: tf.data.Dataset) -> None:
        """Decode the val split into memory now (start-up, as the train split), trace its loop and
        run it once: every later `validate` is the model's forward pass alone."""
        batches = list(dataset)
        self._val_tensors = tuple(tf.concat([b[i] for b in batches], 0) for i in (0, 1))
        # traced and run once: TensorFlow optimises a graph at its first run, not when it is traced
        self._validate_tensors(*self._val_tensors)

    def validate(self, dataset: tf.data.Dataset) -> tuple[float, float]:
        """(summed loss, correct predictions) of the weights that are exported (the EMA's if on),
        on the split held by `hold_validation` if it was called, else on `dataset`."""
        with self.exported_weights():
            if self._val_tensors is None:
                loss, correct = self._validate(dataset)
            else:
                loss, correct = self._validate_tensors(*self._val_tensors)
        return float(loss), float(correct)

    # ------------------------------------------------------------------------------ what is exported

    @contextlib.contextmanager
    def exported_weights(self):
        """Inside the block the model holds the EMA weights (when `ema_decay` is set), then its own."""
        if not self.ema:
            yield
            return
        own = [tf.identity(v) for v in self.averaged]
        for weight, average in zip(self.averaged, self.ema):
            weight.assign(tf.cast(average, weight.dtype))
        try:
            yield
        finally:
            for weight, value in zip(self.averaged, own):
                weight.assign(value)

    def keep_if_best(self, val_accuracy: float, run_dir: Path, is_chief: bool) -> bool:
        """Note the best accuracy on val so far; with `train.export: best`, also keep these weights
        (EMA's if on) in `run_dir`."""
        if val_accuracy <= float(self.best_val.numpy()):
            return False
        self.best_val.assign(val_accuracy)
        if is_chief and self.cfg.export == "best":
            with self.exported_weights():
                tmp = run_dir / f".tmp-{BEST_WEIGHTS}"
                self.model.save_weights(str(tmp))
                tmp.replace(run_dir / BEST_WEIGHTS)
        return True

    def finalize(self, run_dir: Path) -> None:
        """Leave in the model the weights `train.export` names: the last (EMA's if on) or the best on val."""
        best = run_dir / BEST_WEIGHTS
        if self.cfg.export == "best" and best.exists():
            self.model.load_weights(str(best))
            log.info("train: exporting the best weights on val (accuracy %.4f)", float(self.best_val.numpy()))
        elif self.ema:
            for weight, average in zip(self.averaged, self.ema):
                weight.assign(tf.cast(average, weight.dtype))
