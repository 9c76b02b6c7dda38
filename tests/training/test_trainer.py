"""The trainer's verbs on the digits: steps run in chunks on the device train exactly what steps
one at a time do; the EMA is what validation and export see; `export: best` exports the best
epoch; the validation cadence; the linear and one-cycle schedules."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from resnet_pipeline.config import Config
from resnet_pipeline.training import optim


def _train(digits_data, root, **train):
    from resnet_pipeline.training.loop import train as run

    cfg = Config()
    # the digits at their own 8x8 (the crop's padding in proportion): these claims do not hang on the step's cost
    small = {"epochs": 1, "image_size": 8, "pad_crop": 2}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{**small, **train}))
    model, checkpoints = root / "model", root / "checkpoints"  # no test here reads the SavedModel
    summary = run(cfg.train, cfg, digits_data.shards, digits_data.labels, model, checkpoints, saved_model=False)
    assert (model / "model.keras").is_file() and not (model / "saved_model").exists()
    return cfg, summary


def _weights(model_dir):
    import keras

    from resnet_pipeline.models import resnet  # noqa: F401 - registers the custom layers

    return [w.numpy() for w in keras.saving.load_model(model_dir / "model.keras").weights]


# zero_init_residual starts each block as an identity: without it ResNet-20's first float32 gradients are
# so ill-conditioned that one summation order of another (seen once in a pytest-xdist worker that had
# trained other models first) drifts past 1e-5 within the epoch (as in tests/training/test_distributed.py)
DETERMINISTIC = dict(deterministic=True, lr_schedule="constant", warmup_epochs=0, lr=0.01, zero_init_residual=True)


@pytest.mark.slow
def test_chunked_steps_train_the_same_weights_as_single_steps(digits_data, tmp_path):
    _, one = _train(digits_data, tmp_path / "one", summary_every_steps=1, **DETERMINISTIC)
    _, chunked = _train(digits_data, tmp_path / "chunked", summary_every_steps=8, **DETERMINISTIC)
    assert one["steps"] == chunked["steps"]
    for a, b in zip(_weights(tmp_path / "one/model"), _weights(tmp_path / "chunked/model")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "chunked/model/steps.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [8, 16, one["steps"]]  # one row per chunk, the last cut short


@pytest.mark.slow
def test_ema_weights_are_validated_and_exported(digits_data, tmp_path):
    cfg, summary = _train(digits_data, tmp_path / "ema", epochs=2, ema_decay=0.9, checkpoint_every_steps=1000)
    history = json.loads((tmp_path / "ema/model/train.json").read_text())["final"]
    exported = _weights(tmp_path / "ema/model")
    # the exported model's own val accuracy is the one the last epoch reported
    from resnet_pipeline.data.pipeline import Preprocess, make_dataset, shard_files
    from resnet_pipeline.evaluation import load_model

    model = load_model(tmp_path / "ema/model")
    files, n_val = shard_files(digits_data.shards, "val")
    correct = 0
    for images, labels in make_dataset(files, 64, Preprocess.from_train(cfg.train), training=False):
        correct += int(np.sum(np.argmax(model(images, training=False).numpy(), -1) == labels.numpy()))
    assert correct / n_val == pytest.approx(history["val_accuracy"], abs=1e-6)
    assert summary["ema_decay"] == 0.9
    # and they are not the raw weights: a run without EMA (same seed) ends elsewhere
    _train(digits_data, tmp_path / "raw", epochs=2, checkpoint_every_steps=1000)
    raw = _weights(tmp_path / "raw/model")
    assert any(not np.allclose(a, b) for a, b in zip(exported, raw))


@pytest.mark.slow
def test_export_best_exports_the_best_validated_epoch(digits_data, tmp_path):
    _, summary = _train(
        digits_data,
        tmp_path / "best",
        epochs=3,
        validate_every_epochs=1,
        export="best",
        lr=0.2,
        warmup_epochs=0,
        lr_schedule="constant",
        checkpoint_every_steps=1000,
    )
    import csv

    with open(tmp_path / "best/model/history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max(float(r["val_accuracy"]) for r in rows)
    assert summary["best_val_accuracy"] == pytest.approx(best, abs=1e-6)  # history.csv has 6 decimals
    assert summary["exported"] == "best"
    (saved,) = list((tmp_path / "best/checkpoints").glob("*/best.weights.h5"))
    from resnet_pipeline.evaluation import load_model

    model = load_model(tmp_path / "best/model")
    exported = [w.numpy() for w in model.weights]
    model.load_weights(saved)
    for a, b in zip(exported, [w.numpy() for w in model.weights]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_validation_every_n_epochs_and_always_the_last(digits_data, tmp_path):
    _train(digits_data, tmp_path / "cadence", epochs=3, validate_every_epochs=2, checkpoint_every_steps=1000)
    import csv

    with open(tmp_path / "cadence/model/history.csv", newline="") as f:
        validated = [r["val_accuracy"] != "" for r in csv.DictReader(f)]
    assert validated == [False, True, True]


@pytest.mark.parametrize("kind", ["linear", "onecycle"])
def test_linear_and_onecycle_schedules_end_at_zero(kind):
    cfg = dataclasses.replace(Config().train, lr_schedule=kind, epochs=10, lr=0.4, warmup_epochs=1)
    schedule = optim.make_schedule(cfg, steps_per_epoch=100)
    lrs = [float(schedule(s)) for s in range(0, 1001, 50)]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-7) and max(lrs) == pytest.approx(0.4, rel=1e-3)
    if kind == "onecycle":
        peak = int(1000 * optim.ONECYCLE_PEAK)
        assert float(schedule(0)) == pytest.approx(0.04) and float(schedule(peak)) == pytest.approx(0.4, rel=1e-3)
        assert all(a <= b for a, b in zip(lrs[: peak // 50], lrs[1 : peak // 50 + 1]))
    else:
        assert float(schedule(550)) == pytest.approx(0.2, rel=1e-3)  # halfway after the warmup


@pytest.mark.slow
def test_a_run_restored_at_its_last_step_exports_again_without_training(digits_data, tmp_path):
    """The last step is checkpointed: a rerun of a finished run (its model folder gone) trains no
    step and exports the same weights."""
    import shutil

    _, first = _train(digits_data, tmp_path / "again", checkpoint_every_steps=1000)
    before = _weights(tmp_path / "again/model")
    shutil.rmtree(tmp_path / "again/model")
    _, second = _train(digits_data, tmp_path / "again", checkpoint_every_steps=1000)
    assert second["steps"] == first["steps"] and second["loop_seconds"] < first["loop_seconds"]
    for a, b in zip(before, _weights(tmp_path / "again/model")):
        np.testing.assert_array_equal(a, b)
