"""One iterator over all the epochs, and the train split decoded once in memory.

One iterator gives the batches of a fresh per-epoch pipeline, number for number. A split held in
memory holds the shards' images and labels; each of its epochs is one permutation of them, cut in
global steps that the input pipelines share out (resume skip, by-worker and split global batches
included), augmented many at a time with numbers of its own: each image is one of the crops and
mirrors of its own image, all of them about equally often. All the epochs hold the images once."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from resnet_pipeline.config import ShardConfig
from resnet_pipeline.data import pipeline
from resnet_pipeline.data.pipeline import (
    InMemory,
    Preprocess,
    decode_in_memory,
    make_dataset,
    shard_files,
    train_epochs,
)
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


@pytest.mark.slow
def test_in_memory_holds_the_shards_records_and_each_epoch_is_one_permutation_of_them(many_shards):
    files, n = many_shards
    plain = Preprocess(32, augment="none")
    memory = decode_in_memory(files, n, plain)
    assert memory is not None and memory.images.shape == (n, 32, 32, 3) and memory.records == n
    records = tf.data.TFRecordDataset(files).map(pipeline.parse_example)
    shards = [(pipeline.eval_image(encoded, plain).numpy(), int(label)) for encoded, label in records]
    np.testing.assert_allclose(memory.images.numpy() / 255.0, np.stack([x for x, _ in shards]), atol=1e-6)
    assert memory.labels.numpy().tolist() == [y for _, y in shards]

    index = InMemory(memory.images, tf.range(n, dtype=tf.int32))  # labels that name their record
    orders = []
    for seed in (5, 6):
        epoch = _batches(make_dataset(files, BATCH, plain, training=True, seed=seed, in_memory=index))
        order = np.concatenate([y for _, y in epoch])
        assert len(epoch) == n // BATCH and len(set(order.tolist())) == len(order)  # no record twice
        for x, y in epoch:  # each record's own image, unaugmented
            np.testing.assert_allclose(x, memory.images.numpy()[y] / 255.0, atol=1e-6)
        orders.append(order)
        resumed = _batches(make_dataset(files, BATCH, plain, training=True, seed=seed, skip_batches=3, in_memory=index))
        _assert_same(epoch[3:], resumed)
    assert not np.array_equal(orders[0], orders[1])


@pytest.mark.parametrize("split", [True, False], ids=["split-global-batch", "by-worker"])
def test_the_pipelines_in_memory_see_the_one_device_batches_cut_in_slices(many_shards, split):
    """The pipelines of several workers, augmentation included, see exactly one device's batches
    between them (disjoint records, equal counts), whether they split the global batch or not."""
    files, n = many_shards
    memory = decode_in_memory(files, n, PREP)
    one = _batches(make_dataset(files, 4 * BATCH, PREP, training=True, seed=5, in_memory=memory))
    for pipeline_id in (0, 1):
        ctx = _Context(2, pipeline_id, 4)
        part = make_dataset(
            files, BATCH, PREP, training=True, seed=5, input_context=ctx, split_global_batch=split, in_memory=memory
        )
        got = _batches(part)
        assert len(got) == 2 * len(one)
        for step, (x, y) in enumerate(one):
            for k in range(2):
                rows = slice((2 * pipeline_id + k) * BATCH, (2 * pipeline_id + k + 1) * BATCH)
                np.testing.assert_array_equal(got[2 * step + k][0], x[rows])
                np.testing.assert_array_equal(got[2 * step + k][1], y[rows])
        resumed = make_dataset(
            files,
            BATCH,
            PREP,
            training=True,
            seed=5,
            input_context=ctx,
            skip_batches=2,
            split_global_batch=split,
            in_memory=memory,
        )
        _assert_same(got[2 * 2 :], _batches(resumed))


def _graph_bytes(ds: tf.data.Dataset) -> int:
    """The bytes of the dataset's serialized graph: constants it captures included."""
    graph = tf.raw_ops.DatasetToGraphV2(input_dataset=ds._variant_tensor)  # noqa: SLF001
    return len(graph.numpy())


def test_all_the_epochs_of_a_split_in_memory_hold_its_images_once(many_shards):
    """A pipeline per epoch would capture a copy of the images each: 20 epochs, 20 copies."""
    files, n = many_shards
    memory = decode_in_memory(files, n, PREP)
    ds = train_epochs(
        files, BATCH, PREP, seed=1, first_epoch=0, epochs=20, steps_per_epoch=n // BATCH, in_memory=memory
    )
    assert memory.nbytes <= _graph_bytes(ds) < 2 * memory.nbytes


def test_a_resumed_epoch_in_memory_sees_the_images_the_interrupted_one_would_have(many_shards):
    files, n = many_shards
    memory = decode_in_memory(files, n, PREP)
    whole = _batches(make_dataset(files, BATCH, PREP, training=True, seed=8, in_memory=memory))
    for skip in (1, 7, 9):  # inside the first group of steps augmented together, at its end, past it
        resumed = _batches(make_dataset(files, BATCH, PREP, training=True, seed=8, in_memory=memory, skip_batches=skip))
        _assert_same(whole[skip:], resumed)
    again = _batches(make_dataset(files, BATCH, PREP, training=True, seed=8, in_memory=memory))
    _assert_same(whole, again)
    other = _batches(make_dataset(files, BATCH, PREP, training=True, seed=9, in_memory=memory))
    assert not np.array_equal(other[0][0], whole[0][0])


def _coordinates(n: int, size: int) -> InMemory:
    """Images whose pixels name their own row (red), column (green) and record (blue); labels 0..n-1."""
    rows, cols = np.mgrid[0:size, 0:size]
    images = np.stack(
        [
            np.broadcast_to((rows + 1) * 6, (n, size, size)),
            np.broadcast_to((cols + 1) * 6, (n, size, size)),
            np.broadcast_to((np.arange(n) % 251)[:, None, None], (n, size, size)),
        ],
        -1,
    ).astype(np.float32)
    return InMemory(tf.constant(images), tf.range(n, dtype=tf.int32))


@pytest.mark.slow
def test_each_image_in_memory_is_one_crop_and_mirror_of_its_own_all_about_equally_often():
    size, pad, n = 32, 4, 1200
    memory = _coordinates(n, size)
    prep = Preprocess(size, augment="cifar", pad_crop=pad, random_flip=True)
    counts, mirrored, seen = np.zeros((2 * pad + 1, 2 * pad + 1), int), 0, 0
    for seed in range(3):
        for x, y in make_dataset(["a", "b"], BATCH, prep, training=True, seed=seed, in_memory=memory):
            for image, label in zip(x.numpy() * 255.0, y.numpy()):
                centre = image[size // 2, size // 2]
                np.testing.assert_allclose(centre[2], label % 251, atol=1e-3)  # the record's own image
                mirror = image[size // 2, size // 2 + 1, 1] < centre[1]
                top = round(centre[0] / 6) - 1 - size // 2 + pad
                col = round(centre[1] / 6) - 1 + pad  # the padded image's column at the centre
                left = col - (size - 1 - size // 2) if mirror else col - size // 2
                padded = np.pad(memory.images[label].numpy(), [(pad, pad), (pad, pad), (0, 0)])
                expected = padded[top : top + size, left : left + size]
                np.testing.assert_allclose(image, expected[:, ::-1] if mirror else expected, atol=1e-3)
                counts[top, left] += 1
                mirrored += bool(mirror)
                seen += 1
    assert seen == 3 * (n // BATCH) * BATCH
    expected = seen / counts.size
    chi2 = ((counts - expected) ** 2 / expected).sum()  # 80 degrees of freedom: mean 80, P(> 150) < 1e-6
    assert counts.min() > 0 and chi2 < 150, counts
    assert 0.45 < mirrored / seen < 0.55


def test_shift_shear_zoom_in_memory_moves_each_image_its_own_way():
    size, n = 32, 64
    memory = _coordinates(n, size)
    prep = Preprocess(size, augment="shift_shear_zoom")
    x, y = next(iter(make_dataset(["a", "b"], n // 2, prep, training=True, seed=1, in_memory=memory)))
    plain = memory.images.numpy()[y.numpy()] / 255.0
    moved = np.abs(x.numpy() - plain)[..., :2].mean(axis=(1, 2, 3))
    assert (moved > 0).all() and (moved < 0.25).all(), moved
    assert len({round(float(m), 5) for m in moved}) == len(moved), "every image its own transform"


@pytest.mark.slow
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
            ds = make_dataset(files, BATCH, PREP, training=True, seed=9 + epoch, skip_batches=skip, in_memory=in_memory)
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
