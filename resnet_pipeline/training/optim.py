"""Optimizers, learning-rate schedules, weight decay and the loss of the paper's recipes.

- Schedules: `step` divides the lr by 1/`lr_decay_factor` at `lr_decay_at` epochs (ImageNet:
  [30, 60, 90]) or steps (CIFAR: [32000, 48000] of 64k), `cosine` decays to zero over the run,
  `linear` goes straight to zero, `constant`; each after an optional linear warmup from lr/10
  over `warmup_epochs`. `onecycle` (Smith's one-cycle, as the fast CIFAR recipes use it) rises
  from lr/10 to lr over the first quarter of the steps and falls linearly to zero.
- Linear scaling rule (`scale_lr`, Goyal et al. 2017): lr x global_batch_size / 256.
- Weight decay is L2 added to the loss by the trainer, 0.5 x decay x sum(w^2), so that the
  gradient of w gets `weight_decay` x w as in the paper's SGD; BN gamma/beta and biases are skipped
  unless `decay_bn_and_bias`.
- Mixed precision: `mixed_float16` wraps the optimizer in a dynamic LossScaleOptimizer;
  `mixed_bfloat16` needs no loss scaling. The model's logits are float32 either way.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from resnet_pipeline.config import TrainConfig

DECAYED_NAMES = ("kernel",)
ONECYCLE_PEAK = 0.25  # fraction of the run spent rising to the peak lr
BN_AND_BIAS_NAMES = ("gamma", "beta", "bias")


@keras.saving.register_keras_serializable(package="resnet_pipeline")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from base_lr / 10, then `kind`: step (x factor at each boundary), cosine or constant."""

    def __init__(
        self,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "constant",
        boundaries: tuple[int, ...] = (),
        factor: float = 0.1,
    ):
        self.base_lr, self.total_steps, self.warmup_steps = float(base_lr), int(total_steps), int(warmup_steps)
        self.kind, self.boundaries, self.factor = kind, tuple(int(b) for b in boundaries), float(factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base = tf.constant(self.base_lr, tf.float32)
        if self.kind == "step":
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
            lr = base * tf.pow(tf.constant(self.factor, tf.float32), passed)
        elif self.kind in ("cosine", "linear"):
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = 0.5 * base * (1.0 + tf.cos(math.pi * progress)) if self.kind == "cosine" else base * (1.0 - progress)
        elif self.kind == "onecycle":  # up from base/10 over the first quarter, then linearly down to zero
            peak = float(max(int(self.total_steps * ONECYCLE_PEAK), 1))
            up = base / 10 + (base - base / 10) * step / peak
            down = base * tf.clip_by_value((self.total_steps - step) / max(self.total_steps - peak, 1.0), 0.0, 1.0)
            lr = tf.where(step < peak, up, down)
        else:
            lr = base
        if self.warmup_steps > 0:
            warm = base / 10 + (base - base / 10) * step / self.warmup_steps
            lr = tf.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "boundaries": list(self.boundaries),
            "factor": self.factor,
        }


def base_learning_rate(cfg: TrainConfig) -> float:
    """`train.lr`, times global_batch_size / 256 under the linear scaling rule."""
    return cfg.lr * cfg.global_batch_size / 256 if cfg.scale_lr else cfg.lr


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> WarmupSchedule:
    total = cfg.epochs * steps_per_epoch
    warmup = 0 if cfg.lr_schedule == "onecycle" else min(cfg.warmup_epochs * steps_per_epoch, max(total - 1, 0))
    per_unit = steps_per_epoch if cfg.lr_decay_unit == "epochs" else 1
    boundaries = tuple(int(round(b * per_unit)) for b in cfg.lr_decay_at) if cfg.lr_schedule == "step" else ()
    return WarmupSchedule(base_learning_rate(cfg), total, warmup, cfg.lr_schedule, boundaries, cfg.lr_decay_factor)


def make_optimizer(cfg: TrainConfig, lr: WarmupSchedule) -> keras.optimizers.Optimizer:
    """SGD with momentum or Adam on the schedule `lr`; loss-scaled under mixed_float16."""
    if cfg.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=lr)
    else:
        optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum)
    if cfg.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def decayed_variables(model: keras.Model, decay_bn_and_bias: bool) -> list:
    names = DECAYED_NAMES + (BN_AND_BIAS_NAMES if decay_bn_and_bias else ())
    return [v for v in model.trainable_variables if v.name.split("/")[-1].split(":")[0] in names]


def weight_decay_loss(variables: list, weight_decay: float) -> tf.Tensor:
    """0.5 x weight_decay x sum of squares: SGD then adds weight_decay x w to each gradient."""
    return 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in variables])


def per_example_loss(labels: tf.Tensor, logits: tf.Tensor, num_classes: int, label_smoothing: float) -> tf.Tensor:
    logits = tf.cast(logits, tf.float32)
    if label_smoothing:
        return keras.losses.categorical_crossentropy(
            tf.one_hot(labels, num_classes), logits, from_logits=True, label_smoothing=label_smoothing
        )
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
