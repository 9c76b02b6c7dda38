"""tf.data input pipeline over the shards: parse, then separate train and eval image functions."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from resnet_pipeline.data.shard import INDEX
from resnet_pipeline.fileio import read_json

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def shard_files(shards_dir: str | Path, split: str) -> tuple[list[str], int]:
    """The shard files of `split` in order, and their total record count, from index.json."""
    shards_dir = Path(shards_dir)
    index = read_json(shards_dir / INDEX, "shard index")
    entries = [s for s in index["shards"] if s["split"] == split]
    if not entries:
        raise ValueError(f"{shards_dir / INDEX}: no shards for split {split!r}")
    return [str(shards_dir / s["file"]) for s in entries], sum(s["records"] for s in entries)


def parse_example(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image bytes and the int32 label of one tf.train.Example."""
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    return parsed["image/encoded"], tf.cast(parsed["image/class/label"], tf.int32)


def _decode(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return image / 255.0


def eval_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode, resize to `image_size` and scale to [0, 1]."""
    return _decode(encoded, image_size)


def train_image(encoded: tf.Tensor, image_size: int, pad_crop: int, random_flip: bool) -> tf.Tensor:
    """`eval_image` plus the CIFAR augmentation: pad-and-random-crop, optional horizontal flip."""
    image = _decode(encoded, image_size)
    if pad_crop > 0:
        image = tf.image.pad_to_bounding_box(image, pad_crop, pad_crop, image_size + 2 * pad_crop, image_size + 2 * pad_crop)
        image = tf.image.random_crop(image, [image_size, image_size, 3])
    if random_flip:
        image = tf.image.random_flip_left_right(image)
    return image


def make_dataset(
    files: list[str],
    batch_size: int,
    *,
    image_size: int,
    training: bool,
    seed: int = 0,
    pad_crop: int = 0,
    random_flip: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Batches of (image, label) from TFRecord `files`.

    Training reads shuffled files interleaved, shuffles records, augments and drops the last partial
    batch (BatchNormalization and replicas want equal batches). The order is a function of `seed`
    alone, so a resumed run can `skip_batches` to where it stopped. With an `input_context`, each
    input pipeline reads its own files (or its own records, when there are fewer files than pipelines).
    """
    ds = tf.data.Dataset.from_tensor_slices(files)
    if input_context and input_context.num_input_pipelines > 1:
        if len(files) >= input_context.num_input_pipelines:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)), deterministic=True,
                       num_parallel_calls=tf.data.AUTOTUNE)
    if input_context and input_context.num_input_pipelines > len(files):
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(4096, seed=seed + 1)
    ds = ds.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training:
        fn = lambda e, l: (train_image(e, image_size, pad_crop, random_flip), l)  # noqa: E731
    else:
        fn = lambda e, l: (eval_image(e, image_size), l)  # noqa: E731
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=training)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(tf.data.AUTOTUNE)
