"""Schedules, weight decay, loss, strategy and cluster settings: the recipe pieces, one by one."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_pipeline import config as config_mod
from resnet_pipeline.config import ConfigError, TrainConfig
from resnet_pipeline.models.resnet import build_resnet
from resnet_pipeline.training import optim
from resnet_pipeline.training.launch import free_ports, tf_config
from resnet_pipeline.training.strategy import make_strategy, read_tf_config


def _lr(cfg: TrainConfig, steps_per_epoch: int, step: int) -> float:
    return float(optim.make_schedule(cfg, steps_per_epoch)(step))


def test_imagenet_step_schedule_divides_by_ten_at_epochs_30_60_90():
    cfg = TrainConfig(lr=0.1, epochs=100, lr_schedule="step", lr_decay_at=(30, 60, 90), warmup_epochs=0)
    lrs = [_lr(cfg, 10, e * 10) for e in (0, 29, 30, 59, 60, 90, 99)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])


def test_cifar_step_schedule_in_iterations_and_the_linear_scaling_rule():
    cfg = TrainConfig(
        lr=0.1,
        epochs=164,
        global_batch_size=128,
        lr_schedule="step",
        lr_decay_at=(32000, 48000),
        lr_decay_unit="steps",
        warmup_epochs=0,
    )
    assert [_lr(cfg, 391, s) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    scaled = TrainConfig(lr=0.1, global_batch_size=1024, scale_lr=True, lr_schedule="constant", warmup_epochs=0)
    assert _lr(scaled, 10, 5) == pytest.approx(0.4)


def test_warmup_is_linear_from_a_tenth_then_cosine_decays_to_zero():
    cfg = TrainConfig(lr=1.0, epochs=10, warmup_epochs=2, lr_schedule="cosine")
    assert _lr(cfg, 10, 0) == pytest.approx(0.1)
    assert _lr(cfg, 10, 10) == pytest.approx(0.55)
    assert _lr(cfg, 10, 20) == pytest.approx(1.0)
    assert _lr(cfg, 10, 60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert _lr(cfg, 10, 100) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_skips_bn_and_bias_unless_asked():
    model = build_resnet(20, "cifar", num_classes=10)
    kernels = optim.decayed_variables(model, decay_bn_and_bias=False)
    assert kernels and all(v.name == "kernel" for v in kernels)
    assert len(kernels) == sum(1 for v in model.trainable_variables if v.name == "kernel")
    everything = optim.decayed_variables(model, decay_bn_and_bias=True)
    assert len(everything) == len(model.trainable_variables)
    # the gradient of the decay term is weight_decay * w, as in the paper's SGD
    w = tf.Variable([[1.0, -2.0]])
    with tf.GradientTape() as tape:
        loss = optim.weight_decay_loss([w], 1e-4)
    np.testing.assert_allclose(tape.gradient(loss, w).numpy(), [[1e-4, -2e-4]], rtol=1e-6)


def test_label_smoothing_loss():
    labels, logits = tf.constant([1]), tf.constant([[0.0, 2.0, 0.0]])
    plain = float(optim.per_example_loss(labels, logits, 3, 0.0)[0])
    smooth = float(optim.per_example_loss(labels, logits, 3, 0.1)[0])
    log_p = logits[0] - tf.reduce_logsumexp(logits[0])
    target = np.array([0.1 / 3, 1 - 0.1 + 0.1 / 3, 0.1 / 3])
    assert plain == pytest.approx(-float(log_p[1]), rel=1e-6)
    assert smooth == pytest.approx(-float(np.sum(target * log_p.numpy())), rel=1e-6)


def test_mixed_float16_wraps_the_optimizer_in_loss_scaling():
    sched = optim.make_schedule(TrainConfig(), 10)
    assert isinstance(
        optim.make_optimizer(TrainConfig(precision="mixed_float16"), sched), keras.optimizers.LossScaleOptimizer
    )
    assert isinstance(optim.make_optimizer(TrainConfig(precision="mixed_bfloat16"), sched), keras.optimizers.SGD)
    assert isinstance(optim.make_optimizer(TrainConfig(optimizer="adam"), sched), keras.optimizers.Adam)


def test_logits_stay_float32_under_a_mixed_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_resnet(20, "cifar", num_classes=10)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1_conv").compute_dtype == "float16"
    assert model(np.zeros((1, 32, 32, 3), np.float32)).dtype == "float32"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("strategy", "horovod", ["train.strategy", "horovod", "multi_worker"]),
        ("precision", "float16", ["train.precision", "mixed_float16"]),
        ("lr_decay_at", [60, 30], ["train.lr_decay_at", "[60, 30]", "increasing"]),
        ("lr_decay_at", "30", ["train.lr_decay_at", "list of numbers"]),
        ("cpu_devices", 0, ["train.cpu_devices", ">= 1"]),
        ("label_smoothing", 1.0, ["train.label_smoothing", "< 1.0"]),
    ],
)
def test_bad_training_params_are_named(key, value, expected):
    with pytest.raises(ConfigError) as err:
        config_mod.from_dict({"train": {key: value}})
    for text in expected:
        assert text in str(err.value)


def test_step_schedule_without_boundaries_is_an_error():
    with pytest.raises(ConfigError, match="train.lr_decay_at"):
        config_mod.from_dict({"train": {"lr_schedule": "step"}})


def test_tf_config_is_read_and_checked():
    config = tf_config([1111, 2222], 1)
    cluster = read_tf_config({"TF_CONFIG": config})
    assert (cluster.task_type, cluster.task_index, cluster.workers, cluster.is_chief) == ("worker", 1, 2, False)
    assert read_tf_config({"TF_CONFIG": tf_config([1111], 0)}).is_chief
    assert read_tf_config({}) is None
    with pytest.raises(ValueError, match="TF_CONFIG"):
        read_tf_config({"TF_CONFIG": "{not json"})
    bad = json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}})
    with pytest.raises(ValueError, match="worker:3 is not in the cluster"):
        read_tf_config({"TF_CONFIG": bad})
    assert len(set(free_ports(3))) == 3


def test_multi_worker_without_tf_config_says_how_to_start_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="--workers N"):
        make_strategy("multi_worker")
