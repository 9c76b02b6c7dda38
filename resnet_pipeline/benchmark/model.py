"""Forward and training-step throughput of our ResNets, timed beside keras.applications' in one run.

    resnet-pipeline benchmark model --depths 50 --variant v1 --batch-size 16 --image-size 224 --steps 10

As the seed's `time_tensorflow_run`: a few warm-up steps (tracing, allocation), then the duration of
each step, reported as mean and standard deviation. The two models of a depth are timed in
alternating rounds, so that a slow spell of the machine falls on both. Our model is built in
keras.applications' layout where one exists ("v1": stride on the 1x1, biases, its BN settings;
"v2": stride in the last block of a stage), so the two are the same network and the ratio compares
implementations; "v1.5" is timed against keras' v1 ResNet and does more multiply-adds.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from resnet_pipeline.benchmark.harness import Timing, step_row, timed_rounds
from resnet_pipeline.models.flops import multiply_adds
from resnet_pipeline.models.resnet import KERAS_APPLICATIONS_LAYOUT, SPECS, build_resnet
from resnet_pipeline.models.specs import VARIANTS

log = logging.getLogger(__name__)

PHASES = ("forward", "train_step")


def keras_application_name(variant: str, depth: int) -> str | None:
    """The keras.applications builder of the same depth (`ResNet50`, `ResNet50V2`), or None."""
    if variant in ("v1", "v1.5") and depth in (50, 101, 152):
        return f"ResNet{depth}"
    if variant == "v2" and depth in (50, 101, 152):
        return f"ResNet{depth}V2"
    return None


def build_pair(variant: str, depth: int, input_shape: tuple[int, int, int], num_classes: int):
    """(ours, keras.applications' or None) for one depth, both ending in logits."""
    base = VARIANTS[variant].family if variant in VARIANTS else variant
    if depth not in SPECS.get(base, {}):
        raise ValueError(
            f"depth: received {depth} for variant {variant!r}; allowed: {', '.join(map(str, SPECS.get(base, {})))}"
        )
    layout: dict[str, Any] = dict(KERAS_APPLICATIONS_LAYOUT.get(variant, {}))
    if variant == "v1" and SPECS["v1"][depth].block != "bottleneck":
        layout.pop("stride_in_1x1")  # basic blocks have no 1x1
    ours = build_resnet(depth, base, input_shape=input_shape, num_classes=num_classes, **layout)
    name = keras_application_name(variant, depth)
    reference = None
    if name:
        reference = getattr(keras.applications, name)(
            weights=None, input_shape=input_shape, classes=num_classes, classifier_activation=None
        )
    return ours, reference


def step_functions(model: keras.Model, images: tf.Tensor, labels: tf.Tensor) -> dict[str, Callable[[], float]]:
    """The timed steps of a model: an inference forward pass and an SGD training step."""
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)

    @tf.function
    def forward():
        return tf.reduce_sum(model(images, training=False))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    # .numpy() waits for the result, so a step's time is its whole computation
    return {"forward": lambda: float(forward().numpy()), "train_step": lambda: float(train_step().numpy())}


def benchmark_depth(variant: str, depth: int, timing: Timing, *, num_classes: int = 1000, seed: int = 0) -> list[dict]:
    """Rows of figures (one per model and phase) for one depth; keras' rows carry no ratio."""
    shape = (timing.image_size, timing.image_size, 3)
    ours, reference = build_pair(variant, depth, shape, num_classes)
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.uniform(-1, 1, (timing.batch_size, *shape)).astype(np.float32))
    labels = tf.constant(rng.integers(0, num_classes, timing.batch_size).astype(np.int32))
    models = {f"ResNet-{depth} {variant} (ours)": ours}
    if reference is not None:
        models[f"keras.applications.{keras_application_name(variant, depth)}"] = reference
    fns = {label: step_functions(model, images, labels) for label, model in models.items()}
    rows = []
    for phase in PHASES:
        durations = timed_rounds({label: fns[label][phase] for label in models}, timing, f"ResNet-{depth} {phase}")
        for label, model in models.items():
            row = step_row(durations[label], label, phase, depth, variant, timing)
            rows.append({**row, "params": model.count_params(), "multiply_adds": multiply_adds(model)})
        if reference is not None:
            ours_row, keras_row = rows[-2], rows[-1]
            ours_row["ratio_vs_keras"] = ours_row["images_per_sec"] / keras_row["images_per_sec"]
    del fns, models, ours, reference
    keras.backend.clear_session()
    gc.collect()
    return rows


def benchmark_models(variant: str, depths: list[int], **timing: int) -> list[dict]:
    """Rows for each depth; `timing` holds the fields of `Timing` (batch_size, image_size, steps, ...)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: received {variant!r}; allowed: {', '.join(VARIANTS)}")
    rows = []
    for depth in depths:
        rows += benchmark_depth(variant, depth, Timing(**timing))
    return rows


def format_rows(rows: list[dict]) -> str:
    width = max(len("model"), *(len(r["model"]) for r in rows))
    header = (
        f"{'model':<{width}}  {'phase':<10}  {'batch':>5}  {'ms/step (mean ± std)':>22}  {'images/s':>9}  {'ratio':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        timing = f"{r['mean_sec'] * 1e3:.1f} ± {r['std_sec'] * 1e3:.1f}"
        ratio = next((f"{r[k]:.3f}x" for k in ("ratio_vs_keras", "ratio_vs_one_device") if k in r), "")
        lines.append(
            f"{r['model']:<{width}}  {r['phase']:<10}  {r['batch_size']:>5}  {timing:>22}  "
            f"{r['images_per_sec']:>9.1f}  {ratio:>8}"
        )
    return "\n".join(lines)
