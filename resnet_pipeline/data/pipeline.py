"""tf.data input pipeline over the shards: parse, then separate train and eval image functions.

Augmentations (`Preprocess.augment`):

- `cifar`: pad by `pad_crop` pixels and crop back at random (He et al. 2015, CIFAR), optional flip.
- `imagenet`: random-resized-crop (area 8-100%, aspect 3/4-4/3, the Inception/ResNet recipe); a
  JPEG decodes only the crop (`decode_and_crop_jpeg`), optional flip.
- `shift_shear_zoom`: the VOC seed's `ImageDataGenerator` augmentation: shift 20%, shear 0.2
  degrees, zoom 80-120% per axis, nearest fill, optional flip.
- `none`: the eval transform.

Eval resizes the shorter side to `image_size / eval_crop` and takes the centre `image_size` square.
Normalisation (`Preprocess.mode`, params `train.preprocess`): `scale` puts pixels in [0, 1], then
normalises with the per-channel `mean` and `std`; `caffe` is keras.applications' ResNet v1 input
(channels RGB -> BGR, 0..255 minus the ImageNet means); `tf` is ResNetV2's ([-1, 1]).

Every random choice is a stateless op seeded by (seed, position of the record in the epoch), or,
for a train split held in memory (augmented many images at a time), by (seed, global step of the
epoch), so an epoch's images are a function of the seed alone, whatever the parallelism, and a
resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from resnet_pipeline.config import AUGMENTATIONS
from resnet_pipeline.data.contracts import INDEX, check_index
from resnet_pipeline.fileio import read_json, recover_dir

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}
MODES = ("scale", "caffe", "tf")
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)  # keras.applications.imagenet_utils, mode="caffe"
IN_MEMORY_BYTES = 512 * 2**20  # a train split whose decoded float32 images fit is decoded only once
DRAWS = 8  # uniform numbers per image of a split in memory: crop top and left, mirror, 5 of shift/shear/zoom
GROUP_STEPS = 8  # global steps of a split in memory augmented together


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    augment: str = "none"
    pad_crop: int = 4
    random_flip: bool = False
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    eval_crop: float = 1.0
    mode: str = "scale"

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:  # an unknown name would silently train without augmentation
            raise ValueError(f"augment: received {self.augment!r}; allowed: {', '.join(map(repr, AUGMENTATIONS))}")
        if self.mode not in MODES:
            raise ValueError(f"mode: received {self.mode!r}; allowed: {', '.join(map(repr, MODES))}")

    @classmethod
    def from_train(cls, cfg, image_size: int | None = None) -> Preprocess:
        """From a TrainConfig (params.yaml `train:`), `train.preprocess: auto` resolved."""
        from resnet_pipeline.config import input_mode

        return cls(
            image_size or cfg.image_size,
            cfg.augment,
            cfg.pad_crop,
            cfg.random_flip,
            tuple(cfg.mean),
            tuple(cfg.std),
            cfg.eval_crop,
            input_mode(cfg),
        )


def shard_files(shards_dir: str | Path, split: str) -> tuple[list[str], int]:
    """The shard files of `split` in order, and their total record count, from index.json, checked
    against the files (names, counts, sha256) before any is read."""
    shards_dir = Path(shards_dir)
    recover_dir(shards_dir)
    index = read_json(shards_dir / INDEX, "shard index")
    entries = check_index(index, shards_dir, split)
    if not entries:
        raise ValueError(f"{shards_dir / INDEX}: no shards for split {split!r}")
    return [str(shards_dir / s["file"]) for s in entries], sum(s["records"] for s in entries)


def parse_example(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image bytes and the int32 label of one tf.train.Example."""
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    return parsed["image/encoded"], tf.cast(parsed["image/class/label"], tf.int32)


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _normalize(image: tf.Tensor, prep: Preprocess) -> tf.Tensor:
    image = tf.cast(image, tf.float32)
    if prep.mode == "caffe":
        return image[..., ::-1] - tf.constant(CAFFE_BGR_MEANS, tf.float32)
    if prep.mode == "tf":
        return image / 127.5 - 1.0
    image = image / 255.0
    if prep.mean != (0.0, 0.0, 0.0) or prep.std != (1.0, 1.0, 1.0):
        image = (image - tf.constant(prep.mean, tf.float32)) / tf.constant(prep.std, tf.float32)
    return image


def _resize_and_centre_crop(image: tf.Tensor, size: int, crop: float) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    shorter = tf.cast(tf.math.ceil(size / crop), tf.float32)
    scale = shorter / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.image.resize(image, new, method="bilinear")
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[top : top + size, left : left + size, :]


def eval_image(encoded: tf.Tensor, prep: Preprocess | int) -> tf.Tensor:
    """Decode, resize the shorter side to image_size / eval_crop, centre-crop, normalise."""
    prep = Preprocess(prep) if isinstance(prep, int) else prep
    image = _resize_and_centre_crop(_decode(encoded), prep.image_size, prep.eval_crop)
    image.set_shape([prep.image_size, prep.image_size, 3])
    return _normalize(image, prep)


def _seed(seed: tf.Tensor, k: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, k)


def _random_resized_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    is_jpeg = tf.io.is_jpeg(encoded)
    shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(encoded), lambda: tf.shape(_decode(encoded)))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.cond(
        is_jpeg,
        lambda: tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method="INTEGER_FAST"),
        lambda: tf.image.crop_to_bounding_box(_decode(encoded), begin[0], begin[1], crop_size[0], crop_size[1]),
    )
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [size, size], method="bilinear")


def _shift_shear_zoom_transforms(u: tf.Tensor, size: float) -> tf.Tensor:
    """ImageDataGenerator(width/height_shift_range=0.2, shear_range=0.2, zoom_range=0.2) as the
    projective transforms ([n, 8]) of `u` ([n, 5], uniform in [-1, 1]: shifts, shear, zooms)."""
    tx, ty = u[:, 0] * 0.2 * size, u[:, 1] * 0.2 * size
    shear = u[:, 2] * 0.2 * math.pi / 180.0  # degrees, as ImageDataGenerator takes it
    zx, zy = 1.0 + 0.2 * u[:, 3], 1.0 + 0.2 * u[:, 4]
    c, zero = size / 2.0, tf.zeros_like(zx)
    # output -> input map about the centre: x_in = A (x_out - c) + c + t
    a0, a1 = zx, -tf.sin(shear) * zy
    b0, b1 = zero, tf.cos(shear) * zy
    return tf.stack([a0, a1, c - a0 * c - a1 * c + tx, b0, b1, c - b0 * c - b1 * c + ty, zero, zero], axis=1)


def _transform(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """Each of `images` ([n, h, w, 3]) through its projective transform, bilinear, nearest fill."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        interpolation="BILINEAR",
        fill_mode="NEAREST",
        fill_value=0.0,
    )


def _shift_shear_zoom(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The seed's shift, shear and zoom of one image, nearest fill."""
    u = tf.random.stateless_uniform([1, 5], seed, -1.0, 1.0)
    return _transform(image[None], _shift_shear_zoom_transforms(u, tf.cast(tf.shape(image)[0], tf.float32)))[0]


def _base_image(encoded: tf.Tensor, prep: Preprocess) -> tf.Tensor:
    """A training image before its random part (all but `imagenet`): decoded, resized, centre-cropped."""
    return _resize_and_centre_crop(_decode(encoded), prep.image_size, prep.eval_crop)


def _augment(image: tf.Tensor, prep: Preprocess, seed: tf.Tensor) -> tf.Tensor:
    """The random part of a training image (after `_base_image`, or after imagenet's crop), normalised."""
    size = prep.image_size
    if prep.augment == "cifar" and prep.pad_crop > 0:
        padded = size + 2 * prep.pad_crop
        image = tf.image.pad_to_bounding_box(image, prep.pad_crop, prep.pad_crop, padded, padded)
        image = tf.image.stateless_random_crop(image, [size, size, 3], _seed(seed, 1))
    elif prep.augment == "shift_shear_zoom":
        image = _shift_shear_zoom(image, _seed(seed, 2))
    if prep.random_flip and prep.augment != "none":
        image = tf.image.stateless_random_flip_left_right(image, _seed(seed, 3))
    image.set_shape([size, size, 3])
    return _normalize(tf.clip_by_value(image, 0.0, 255.0), prep)


def train_image(encoded: tf.Tensor, prep: Preprocess, seed: tf.Tensor) -> tf.Tensor:
    """One augmented training image; `seed` is a shape-[2] int tensor (stateless ops)."""
    if prep.augment == "imagenet":
        return _augment(_random_resized_crop(encoded, prep.image_size, _seed(seed, 0)), prep, seed)
    return _augment(_base_image(encoded, prep), prep, seed)


def augment_batch(images: tf.Tensor, u: tf.Tensor, prep: Preprocess) -> tf.Tensor:
    """The random part of many training images at once ([n, size, size, 3] float32 after
    `_base_image`), normalised, from `u` ([n, DRAWS] uniform in [0, 1), one row per image): the
    augmentation of `_augment` with the same distribution, in a handful of batched ops (one gather
    of rows and one of columns for crop and mirror, one transform for shift/shear/zoom)."""
    size = prep.image_size
    if prep.augment == "shift_shear_zoom":
        images = _transform(images, _shift_shear_zoom_transforms(2.0 * u[:, 3:8] - 1.0, float(size)))
    pad = prep.pad_crop if prep.augment == "cifar" else 0
    mirror = prep.random_flip and prep.augment != "none"
    if pad or mirror:
        span = tf.range(size)[None]
        top, left = (tf.minimum(tf.cast(u[:, k] * (2 * pad + 1), tf.int32), 2 * pad)[:, None] for k in (0, 1))
        cols = left + span
        if mirror:  # the columns in reverse order: the image mirrored
            cols = tf.where(u[:, 2:3] < 0.5, left + size - 1 - span, cols)
        if pad:
            images = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            images = tf.gather(images, top + span, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    images.set_shape([None, size, size, 3])
    return _normalize(tf.clip_by_value(images, 0.0, 255.0), prep)


@dataclass(frozen=True)
class InMemory:
    """A split's images before augmentation, decoded once, and their labels, in the shards' order."""

    images: tf.Tensor
    labels: tf.Tensor

    @property
    def records(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.images.shape.num_elements()) * self.images.dtype.size


def decode_in_memory(files: list[str], records: int, prep: Preprocess) -> InMemory | None:
    """The split's images before augmentation, when their float32 pixels fit in IN_MEMORY_BYTES and
    the augmentation starts from the whole image (not `imagenet`, which decodes only its crop);
    else None. Training then decodes and resizes each image once instead of once per epoch."""
    if prep.augment == "imagenet" or records * prep.image_size**2 * 3 * 4 > IN_MEMORY_BYTES:
        return None

    def base(record):
        encoded, label = parse_example(record)
        return _base_image(encoded, prep), label

    ds = tf.data.TFRecordDataset(files).map(base, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = [(x, y) for x, y in ds.batch(4096)]
    if not batches:
        return None
    return InMemory(tf.concat([x for x, _ in batches], 0), tf.concat([y for _, y in batches], 0))


def make_dataset(
    files: list[str],
    batch_size: int,
    prep: Preprocess,
    *,
    training: bool,
    seed: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    skip_batches: int = 0,
    split_global_batch: bool = False,
    in_memory: InMemory | None = None,
) -> tf.data.Dataset:
    """Batches of (image, label) from TFRecord `files`; `batch_size` is the per-replica batch.

    Training reads shuffled files interleaved, shuffles records, augments and drops the last partial
    batch (BatchNormalization and replicas want equal batches). The order and the augmentation are
    functions of `seed` alone, so a resumed run can skip the `skip_batches` global steps of the
    epoch already trained (before decoding: skipping costs no image work).

    With an `input_context` of several input pipelines (one per worker), each pipeline reads its
    own files (or its own records, when there are fewer files than pipelines) and repeats them, as
    shards rarely hold equal counts. With `split_global_batch`, every pipeline reads all records
    in the same order instead and keeps its replicas' slice of each global batch, so that the
    replicas together see exactly the global batches, and the augmentations, of one device.

    With `in_memory` (training), the epoch is one permutation of the decoded images instead, cut
    into global steps of which each pipeline keeps its replicas' slice (`_memory_batches`): each
    image only augmented, many at once, with the same distribution of crops, mirrors and
    transforms as the shards' path but numbers of their own.
    """
    ctx = input_context
    pipelines = ctx.num_input_pipelines if ctx else 1
    pipeline_id = ctx.input_pipeline_id if ctx else 0
    local_replicas = ctx.num_replicas_in_sync // pipelines if ctx else 1
    split = split_global_batch and pipelines > 1
    by_worker = pipelines > 1 and not split
    if training and in_memory is not None:
        return _memory_batches(
            in_memory, prep, batch_size, ctx, seed=seed, first_epoch=0, epochs=1, skip_steps=skip_batches
        )
    ds, per_file = tf.data.Dataset.from_tensor_slices(files), tf.data.TFRecordDataset
    if by_worker and len(files) >= pipelines:
        ds = ds.shard(pipelines, pipeline_id)
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        per_file, cycle_length=min(4, len(files)), deterministic=True, num_parallel_calls=tf.data.AUTOTUNE
    )
    if by_worker and pipelines > len(files):
        ds = ds.shard(pipelines, pipeline_id)
    if not training:

        def eval_fn(record):
            encoded, label = parse_example(record)
            return eval_image(encoded, prep), label

        ds = ds.map(eval_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    ds = ds.shuffle(4096, seed=seed + 1)
    if by_worker:
        ds = ds.repeat()
    local = batch_size * local_replicas  # records this pipeline feeds per global step
    start = pipeline_id * local if split else 0
    base = tf.constant([seed, pipeline_id if by_worker else 0], tf.int64)
    ds = ds.enumerate()  # the record's position in the epoch seeds its augmentation
    if split and ctx is not None:
        ds = ds.batch(batch_size * ctx.num_replicas_in_sync, drop_remainder=True)
        ds = ds.map(lambda i, r: (i[start : start + local], r[start : start + local])).unbatch()
    if skip_batches:
        ds = ds.skip(skip_batches * local)

    def train_fn(i, record):
        encoded, label = parse_example(record)
        return train_image(encoded, prep, _seed(base, tf.cast(i, tf.int32))), label

    ds = ds.map(train_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _memory_batches(
    memory: InMemory,
    prep: Preprocess,
    batch_size: int,
    ctx: tf.distribute.InputContext | None,
    *,
    seed: int,
    first_epoch: int,
    epochs: int,
    skip_steps: int = 0,
    steps_per_epoch: int | None = None,
) -> tf.data.Dataset:
    """Per-replica batches of epochs `first_epoch` .. `epochs - 1` of a split held in memory, in
    one dataset (the images are captured once, whatever the number of epochs).

    Epoch e is one permutation of the records (`stateless_shuffle` keyed by `seed + e`), cut into
    global steps of `batch_size` x replicas records (the last partial step dropped; at most
    `steps_per_epoch` of them; the first epoch from `skip_steps` on, when resuming). Each step
    draws its images' uniform numbers at once, keyed by (`seed + e`, step), and every input
    pipeline keeps its replicas' slice of the step's records and numbers: the pipelines see
    disjoint records, exactly balanced, and together the batches and augmentations of one device,
    whether or not they split the global batch. `GROUP_STEPS` steps are gathered and augmented
    together (`augment_batch`): a few batched ops per group instead of a dozen per image."""
    pipelines = ctx.num_input_pipelines if ctx else 1
    replicas = ctx.num_replicas_in_sync if ctx else 1
    local = batch_size * (replicas // pipelines)  # records this pipeline feeds per global step
    start = (ctx.input_pipeline_id if ctx else 0) * local
    step_records = batch_size * replicas
    records = memory.records
    steps = records // step_records
    if steps_per_epoch is not None:
        steps = min(steps, steps_per_epoch)
    if steps < 1:
        raise ValueError(f"a split of {records} records in memory has no full global step of {step_records}")

    def epoch_steps(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64) + epoch, tf.constant(1, tf.int64)])
        order = tf.random.experimental.stateless_shuffle(tf.range(records, dtype=tf.int32), key)
        rows = tf.reshape(order[: steps * step_records], [steps, step_records])[:, start : start + local]
        first = tf.where(epoch == first_epoch, tf.constant(skip_steps, tf.int64), 0)
        draw_key = tf.stack([tf.constant(seed, tf.int64) + epoch, tf.constant(0, tf.int64)])

        def draw(step, records_of_step):
            u = tf.random.stateless_uniform([step_records, DRAWS], _seed(draw_key, tf.cast(step, tf.int32)))
            return records_of_step, u[start : start + local]

        indices = tf.data.Dataset.range(first, steps)
        return tf.data.Dataset.zip(indices, tf.data.Dataset.from_tensor_slices(rows[first:])).map(draw)

    def augment(records_of_steps, u):
        flat = tf.reshape(records_of_steps, [-1])
        images = augment_batch(tf.gather(memory.images, flat), tf.reshape(u, [-1, DRAWS]), prep)
        size = prep.image_size
        return (
            tf.reshape(images, [-1, batch_size, size, size, 3]),
            tf.reshape(tf.gather(memory.labels, flat), [-1, batch_size]),
        )

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_steps)
    ds = ds.batch(GROUP_STEPS).map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.unbatch().prefetch(tf.data.AUTOTUNE)


def train_epochs(
    files: list[str],
    batch_size: int,
    prep: Preprocess,
    *,
    seed: int,
    first_epoch: int,
    epochs: int,
    steps_per_epoch: int,
    skip_batches: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    split_global_batch: bool = False,
    in_memory: InMemory | None = None,
) -> tf.data.Dataset:
    """Epochs `first_epoch` .. `epochs - 1` of `make_dataset(training=True, seed=seed + epoch)`, one
    after the other in one dataset, each cut to the `steps_per_epoch` global steps the loop trains
    of it (the first from `skip_batches` on, when resuming).

    One iterator serves the whole run: the next epoch's images are being prepared while this one's
    last steps, its validation and its checkpoint run, instead of a new pipeline starting empty at
    every epoch. Each epoch holds exactly the batches a per-epoch pipeline would give. A split
    held in memory is one stream of epochs (`_memory_batches`) that holds its images once: a
    pipeline per epoch would capture a copy of them each (30 epochs of a 400 MB split, 12 GB).
    """
    if not 0 <= first_epoch < epochs:
        raise ValueError(f"train_epochs: first_epoch {first_epoch} is not an epoch of 0 .. {epochs - 1}")
    ctx = input_context
    if in_memory is not None:
        return _memory_batches(
            in_memory,
            prep,
            batch_size,
            ctx,
            seed=seed,
            first_epoch=first_epoch,
            epochs=epochs,
            skip_steps=skip_batches,
            steps_per_epoch=steps_per_epoch,
        )
    local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines if ctx else 1

    def epoch_batches(epoch: int) -> tf.data.Dataset:
        skip = skip_batches if epoch == first_epoch else 0
        ds = make_dataset(
            files,
            batch_size,
            prep,
            training=True,
            seed=seed + epoch,
            input_context=ctx,
            skip_batches=skip,
            split_global_batch=split_global_batch,
        )
        return ds.take((steps_per_epoch - skip) * local_replicas)

    # Python-int seeds, as a per-epoch pipeline has them (tf.data's shuffle cannot take a tensor seed
    # when the global seed is 0), in a balanced tree of concatenations: an element passes through
    # log2(epochs) of them, and each epoch's pipeline starts only when the one before it ends.
    def joined(first: int, end: int) -> tf.data.Dataset:
        if end - first == 1:
            return epoch_batches(first)
        middle = (first + end) // 2
        return joined(first, middle).concatenate(joined(middle, end))

    return joined(first_epoch, epochs).prefetch(tf.data.AUTOTUNE)
