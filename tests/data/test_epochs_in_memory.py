"""One iterator over all the epochs, and the train split decoded once in memory: both give the
batches of a fresh per-epoch pipeline over the shards, number for number (resume skip, several
input pipelines and split global batches included)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from resnet_pipeline.config import ShardConfig
from resnet_pipeline.data import pipeline
from resnet_pipeline.data.pipeline import Preprocess, decode_in_memory, make_dataset, shard_files, train_epochs
from resnet_pipeline.data.shard import shard

PREP = Preprocess(32, augment="cifar", pad_crop=4)
BATCH = 16


@pytest.fixture(scope="module")
def many_shards(digits_data, tmp_path_factory):
    """The digits' train split in several small shards, so files are shuffled and interleaved."""
    out = tmp_path_factory.mktemp("many") / "shards"
    shard(ShardConfig(target_shard_mb=0.02), digits_data.manifest, digits_data.raw, out)
    files, n = shard_files(out, "train")
    assert len(files) >= 5
    return files, n


def _batches(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


class _Context:
    """What `tf.distribute.InputContext` tells one of several input pipelines (no strategy needed)."""

    def __init__(self, pipelines: int, pipeline_id: int, replicas: int):
        self.num_input_pipelines, self.input_pipeline_id, self.num_replicas_in_sync = pipelines, pipeline_id, replicas


@pytest.mark.parametrize(
    "ctx, split",
    [
        pytest.param(None, False, id="one-pipeline"),
        pytest.param(_Context(2, 1, 2), False, id="by-worker"),
        pytest.param(_Context(2, 0, 4), True, id="split-global-batch"),
    ],
)
def test_in_memory_batches_are_those_of_the_shards(many_shards, ctx, split):
    files, n = many_shards
    memory = decode_in_memory(files, n, PREP)
    assert memory is not None and memory.images.shape == (n, 32, 32, 3)
    for skip in (0, 3):
        kwargs = dict(training=True, seed=5, input_context=ctx, skip_batches=skip, split_global_batch=split)
        streamed = make_dataset(files, BATCH, PREP, **kwargs).take(20)
        held = make_dataset(files, BATCH, PREP, in_memory=memory, **kwargs).take(20)
        _assert_same(_batches(streamed), _batches(held))


def test_one_iterator_over_the_epochs_gives_each_epochs_own_batches(many_shards):
    files, n = many_shards
    steps = n // BATCH
    memory = decode_in_memory(files, n, PREP)
    for in_memory in (None, memory):
        run = _batches(
            train_epochs(
                files,
                BATCH,
                PREP,
                seed=9,
                first_epoch=1,
                epochs=4,
                steps_per_epoch=steps,
                skip_batches=2,
                in_memory=in_memory,
            )
        )
        expected = []
        for epoch in (1, 2, 3):
            skip = 2 if epoch == 1 else 0
            ds = make_dataset(files, BATCH, PREP, training=True, seed=9 + epoch, skip_batches=skip)
            expected += _batches(ds.take(steps - skip))
        _assert_same(expected, run)
    assert len(run) == 3 * steps - 2


def test_a_split_too_large_or_an_imagenet_crop_is_not_held_in_memory(many_shards, monkeypatch):
    files, n = many_shards
    assert decode_in_memory(files, n, Preprocess(32, augment="imagenet")) is None
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", n * 32 * 32 * 3 * 4 - 1)
    assert decode_in_memory(files, n, PREP) is None


def test_validation_in_memory_equals_validation_over_the_dataset(digits_data):
    from resnet_pipeline.config import Config
    from resnet_pipeline.training.trainer import Trainer

    cfg = Config().train
    trainer = Trainer(cfg, tf.distribute.get_strategy(), 10, steps_per_epoch=10)
    trainer.build()
    files, n_val = shard_files(digits_data.shards, "val")
    ds = make_dataset(files, cfg.global_batch_size, Preprocess.from_train(cfg), training=False)
    assert n_val % cfg.global_batch_size, "the last batch is a partial one"
    loss, correct = trainer.validate(ds)
    trainer.hold_validation(ds)
    assert trainer._val_tensors[0].shape[0] == n_val
    for _ in range(2):
        held_loss, held_correct = trainer.validate(ds)
        assert held_correct == correct
        assert held_loss == pytest.approx(loss, rel=1e-5)


def test_no_epoch_left_is_an_error_not_an_endless_recursion(many_shards):
    files, n = many_shards
    for first in (4, 5, -1):
        with pytest.raises(ValueError, match="is not an epoch of 0 .. 3"):
            train_epochs(files, BATCH, PREP, seed=1, first_epoch=first, epochs=4, steps_per_epoch=n // BATCH)
