"""Fine-tuning controls checked on the weights, under MirroredStrategy with 2 replicas (2 logical
CPU devices), through a SIGTERM in the head phase and a resume.

Runs are `resnet-pipeline train` in subprocesses (logical devices must be set before TensorFlow
starts), on the digits shards (11 steps of 128 per epoch), starting from a ResNet-20 saved as
.keras whose BN statistics are set away from 0/1.
"""

from __future__ import annotations

import signal
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_pipeline.models.resnet import build_resnet, recursion_limit
from resnet_pipeline.training.finetune import stage_of
from tests.training.test_distributed import _cmd, _env, _train, _wait_for_checkpoint, work  # noqa: F401

pytestmark = pytest.mark.slow  # every test trains

BATCH = 128
STEPS_PER_EPOCH = 1419 // BATCH  # 11


def _start_model(path) -> keras.Model:
    keras.utils.set_random_seed(7)
    model = build_resnet(20, "cifar", num_classes=10)
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, g.shape),
                    rng.normal(0, 0.1, b.shape),
                    rng.normal(0, 0.1, m.shape),
                    rng.uniform(0.5, 1.5, v.shape),
                ]
            )
    model.save(path)
    return model


def _by_layer(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [w.numpy() for w in layer.weights] for layer in model.layers if layer.weights}


def _changed(a: list[np.ndarray], b: list[np.ndarray]) -> list[bool]:
    return [not np.array_equal(x, y) for x, y in zip(a, b)]


def _restore(checkpoint: str) -> dict[str, list[np.ndarray]]:
    model = build_resnet(20, "cifar", num_classes=10)
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    return _by_layer(model)


def test_freeze_bn_trainable_from_and_the_head_phase_on_two_replicas_through_a_resume(work):  # noqa: F811
    start = _by_layer(_start_model(work / "start.keras"))
    sets = [
        "train.strategy=mirrored",
        "train.cpu_devices=2",
        "train.epochs=2",
        "train.head_epochs=1",
        "train.freeze_bn=true",
        "train.trainable_from=conv3",
        "train.head_lr_multiplier=10",
        f"train.init={work / 'start.keras'}",
        "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=10",
        "train.lr=0.05",
        "train.warmup_epochs=0",
        f"train.global_batch_size={BATCH}",
    ]
    ckpt_root = work / "artifacts/checkpoints"
    proc = subprocess.Popen(
        _cmd(sets), cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_checkpoint(proc, ckpt_root, 4)  # SIGTERM inside the head phase (epoch 1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    resumed = _train(work, sets)
    assert "resuming from" in resumed.stderr + resumed.stdout

    run_dir = next(ckpt_root.iterdir())
    head_end = _restore(str(run_dir / f"ckpt-{STEPS_PER_EPOCH}"))  # the last step of the head phase
    for name, weights in start.items():  # only the head moved, on the resumed run too
        assert any(_changed(weights, head_end[name])) == (name == "logits"), name

    with recursion_limit():
        final = _by_layer(keras.saving.load_model(work / "artifacts/model/model.keras"))
    for name, weights in start.items():
        moved = _changed(weights, final[name])
        if "_bn" in name:  # freeze_bn: gamma, beta and both moving statistics as loaded
            assert not any(moved), name
        elif stage_of(name) < 3:  # trainable_from conv3: the stem and conv2 as loaded
            assert not any(moved), name
        else:
            assert all(moved), name
    record = (work / "artifacts/model/init.json").read_text()
    assert '"trainable_from": "conv3"' in record and "start.keras" in record


def test_warmstart_benchmark_smoke_registers_and_fine_tunes_from_the_version(tmp_path):
    """The benchmark at its smallest: one seed, one epoch each (its figures come from the command)."""
    import json

    from resnet_pipeline.benchmark.warmstart import SOURCE, format_result, run
    from resnet_pipeline.registry import open_registry, register_model

    result = run(
        tmp_path,
        epochs=1,
        source_epochs=1,
        seeds=(1,),
        overrides={"global_batch_size": 128, "image_size": 8, "pad_crop": 2},
        project_params_arm=False,
    )
    row = result["rows"][0]
    assert 0 <= row["scratch"] <= 1 and 0 <= row["warm"] <= 1 and row["gain"] == row["warm"] - row["scratch"]
    assert "seed" in format_result(result) and f"registered as {SOURCE}:1" in format_result(result)
    record = json.loads((tmp_path / "runs/b-warm-1/model/init.json").read_text())["init"]
    assert record["init"] == f"{SOURCE}@champion" and record["reinitialised"] == ["logits"]  # 6 classes, then 4
    assert record["source"] == f"{SOURCE}@champion ({SOURCE}:1)" and len(record["sha256"]) == 64
    scratch = json.loads((tmp_path / "runs/b-scratch-1/model/init.json").read_text())
    assert scratch["init"] is None
    reg = open_registry(tmp_path / "registry")  # the fine-tuned model registered: its metadata says where it started
    register_model(
        reg,
        "digits-b",
        tmp_path / "runs/b-warm-1/model",
        tmp_path / "runs/b-warm-1/eval",
        tmp_path / "registered-b.json",
    )
    meta = reg.manifest("digits-b:1")["init"]
    assert meta["init"]["sha256"] == record["sha256"] and meta["init"]["loaded"] == record["loaded"]
    assert meta["finetune"]["head_epochs"] == 0


def test_the_phase_line_is_logged_only_when_fine_tuning(caplog):
    import logging

    from resnet_pipeline.config import TrainConfig
    from resnet_pipeline.training.finetune import FineTune

    model = build_resnet(20, "cifar", num_classes=10)
    with caplog.at_level(logging.INFO, logger="resnet_pipeline.training.finetune"):
        FineTune(model, TrainConfig()).enter(0)  # a plain training from scratch
        assert "fine-tune:" not in caplog.text
        FineTune(model, TrainConfig(freeze_bn=True)).enter(0)
    assert "fine-tune: epoch 1 in the all phase" in caplog.text
