"""Training throughput of one device vs MirroredStrategy over N replicas, timed in one run.

    resnet-pipeline benchmark model --depths 20 --variant cifar --image-size 32 --batch-size 128 --replicas 2

Without GPUs the replicas are logical CPU devices (`train.cpu_devices`), which share the machine's
cores: on a CPU this measures what the strategy costs (per-replica graphs, gradient all-reduce),
not a speed-up; on a box with N GPUs it measures the scaling. Both sides train our model with the
same global batch, held in memory so that no input pipeline is timed, in alternating rounds.
"""

from __future__ import annotations

import gc
import logging

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline.benchmark.harness import Timing, step_row, timed_rounds
from resnet_pipeline.models.resnet import build_resnet
from resnet_pipeline.training.strategy import split_cpu

log = logging.getLogger(__name__)


def prepare_devices(replicas: int) -> None:
    """Before TensorFlow starts: as many logical CPU devices as replicas when there is no GPU."""
    if not tf.config.list_physical_devices("GPU"):
        split_cpu(replicas)


def mirrored(replicas: int) -> tf.distribute.MirroredStrategy:
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))][:replicas]
    if len(devices) < replicas:
        raise ValueError(
            f"--replicas: received {replicas}; this machine has {len(devices)} devices "
            "(split the CPU before TensorFlow starts: prepare_devices)"
        )
    return tf.distribute.MirroredStrategy(devices)


def _train_step(strategy: tf.distribute.Strategy, build, images: np.ndarray, labels: np.ndarray):
    gbs = len(images)
    with strategy.scope():
        model = build()
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    per_replica = gbs // strategy.num_replicas_in_sync

    def value_fn(ctx: tf.distribute.ValueContext):
        start = ctx.replica_id_in_sync_group * per_replica
        return images[start : start + per_replica], labels[start : start + per_replica]

    x, y = strategy.experimental_distribute_values_from_function(value_fn)

    def replica_fn(xs, ys):
        with tf.GradientTape() as tape:
            logits = model(xs, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(ys, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=gbs)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_fn, args=(x, y)), axis=None)

    return lambda: float(step().numpy())


def benchmark_replicas(
    variant: str, depth: int, timing: Timing, *, replicas: int, num_classes: int = 1000, seed: int = 0, **layout
) -> list[dict]:
    """Rows for one device and for `replicas` mirrored replicas, training with global batch `timing.batch_size`."""
    batch_size, side = timing.batch_size, timing.image_size
    if batch_size % replicas:
        raise ValueError(f"--batch-size: received {batch_size}; must be a multiple of --replicas {replicas}")
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch_size, side, side, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)

    def build():
        return build_resnet(depth, variant, input_shape=(side, side, 3), num_classes=num_classes, **layout)

    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
    sides = {
        "one device": _train_step(tf.distribute.OneDeviceStrategy(device), build, images, labels),
        f"MirroredStrategy, {replicas} replicas": _train_step(mirrored(replicas), build, images, labels),
    }
    durations = timed_rounds(sides, timing, "replicas")
    rows = [
        step_row(d, f"ResNet-{depth} {variant}, {label}", "train_step", depth, variant, timing)
        for label, d in durations.items()
    ]
    rows[1]["ratio_vs_one_device"] = rows[1]["images_per_sec"] / rows[0]["images_per_sec"]
    del sides
    keras.backend.clear_session()
    gc.collect()
    return rows
