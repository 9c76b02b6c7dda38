"""Images per second of several ways to feed training from one folder of JPEGs, timed in one run.

The folder holds one sub-folder per class (`c00/…jpg`, `c01/…jpg`, …), as `flow_from_directory`
and `image_dataset_from_directory` expect. Sources, each a batch iterator:

- ours: supplied by the caller as a factory returning a `tf.data.Dataset` (our TFRecord pipeline);
  this module does not import it, so it stays a reference that our code is measured against;
- `ImageDataGenerator.flow_from_directory` with the VOC seed's augmentation (PIL decode, scipy
  affine transforms, one Python thread) — what the seed trained with;
- `keras.utils.image_dataset_from_directory` (tf.data, parallel decode + resize, no augmentation);
- JPEG decode only: `tf.io.read_file` + `tf.io.decode_jpeg` of every file in parallel, no resize, no
  batching of pixels; a ceiling for any pipeline that decodes JPEGs on this machine.

A source's first `warmup_batches` batches (file listing, tracing, filling buffers) are not timed;
then `n_images` images are counted by each batch's first dimension. The sources are timed in
alternating rounds (`repeats`), so that a slow spell of the machine falls on all of them, and a row
reports the median. `ratio` is ours / that row: how many times faster our pipeline is.

    resnet-pipeline benchmark input [--images DIR | --photos] [--count 1000] [--image-size 224] [--batch-size 32]

`--photos` builds the folder from the photographs the installed packages ship (random 500x375
crops and mirror images of china.jpg, flower.jpg and grace_hopper.jpg), so that the figure on real
content can be rerun anywhere; without it, the folder holds generated images.

`compare` shards the folder with our stages (shorter side capped at write time) and times our
training pipeline against the others.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

OURS = "ours (TFRecord shards)"
GENERATOR = "ImageDataGenerator.flow_from_directory (seed)"
KERAS_DATASET = "image_dataset_from_directory"
DECODE_ONLY = "JPEG decode only"
NAMES = (OURS, GENERATOR, KERAS_DATASET, DECODE_ONLY)

JPEG_SUFFIXES = (".jpg", ".jpeg")


# --- the folder of JPEGs ---------------------------------------------------------------------


def _synthetic_photo(rng: np.random.Generator, width: int, height: int, label: int, classes: int):
    """A smooth two-colour gradient, a few filled shapes and mild grain: compresses like a photo."""
    from PIL import Image, ImageDraw

    # background: gradient between two colours, the first near a hue of the class, in a random direction
    hue = np.array(
        [
            np.cos(2 * np.pi * label / classes),
            np.cos(2 * np.pi * (label / classes - 1 / 3)),
            np.cos(2 * np.pi * (label / classes + 1 / 3)),
        ]
    )
    c0 = np.clip(128 + 90 * hue + rng.normal(0, 20, 3), 0, 255)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.cos(angle) * x / width + np.sin(angle) * y / height
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    # a low-frequency ripple, so the background is not a plain ramp
    t = np.clip(t + 0.08 * np.sin(x / rng.uniform(15, 60) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(15, 60)), 0, 1)
    base = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = Image.fromarray(base.astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        w, h = rng.uniform(0.08, 0.45) * width, rng.uniform(0.08, 0.45) * height
        x0, y0 = rng.uniform(-0.1 * width, width - w / 2), rng.uniform(-0.1 * height, height - h / 2)
        box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            pts = [(float(rng.uniform(box[0], box[2])), float(rng.uniform(box[1], box[3]))) for _ in range(3)]
            draw.polygon(pts, fill=fill)

    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 6, arr.shape).astype(np.float32)  # sensor-like grain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_jpeg_folder(
    folder: Path,
    n_images: int = 1000,
    size: tuple[int, int] = (500, 375),
    classes: int = 10,
    seed: int = 0,
    quality: int = 90,
    photos: bool = False,
) -> Path:
    """Write `n_images` JPEGs of `size` (width, height) into class sub-folders `c00`, `c01`, ...; return
    `folder`. Image i is generated (or, with `photos`, a random crop or mirror image of a bundled
    photo) from a generator seeded by (seed, i), in class i % classes, so the folder is the same on
    every call; existing files of the same names are overwritten."""
    if n_images < 1 or classes < 1:
        raise ValueError(f"n_images and classes must be positive; received {n_images}, {classes}")
    width, height = size
    if photos:
        draw, stem = _photo_crops(width, height), "photo"
    else:
        draw, stem = (lambda rng, i: _synthetic_photo(rng, width, height, i % classes, classes)), "img"
    folder = Path(folder)
    digits = max(2, len(str(classes - 1)))
    for c in range(classes):
        (folder / f"c{c:0{digits}d}").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        img = draw(np.random.default_rng([seed, i]), i)
        img.save(folder / f"c{i % classes:0{digits}d}" / f"{stem}_{i:05d}.jpg", format="JPEG", quality=quality)
    return folder


def bundled_photos() -> list:
    """The photographs that the installed packages ship: scikit-learn's china.jpg and flower.jpg,
    matplotlib's grace_hopper.jpg (real content, where JPEG cost depends on what is in the picture)."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        photos.append(img.convert("RGB"))
    return photos


def _photo_crops(width: int, height: int) -> Callable:
    """`draw(rng, i)`: a random crop of `width` x `height` of bundled photo i (mirrored half the time)."""
    from PIL import Image

    photos = bundled_photos()

    def draw(rng: np.random.Generator, i: int):
        photo = photos[i % len(photos)]
        scale = max(width / photo.width, height / photo.height, 1.0)  # native resolution when the crop fits
        if scale > 1.0:
            photo = photo.resize((int(np.ceil(photo.width * scale)), int(np.ceil(photo.height * scale))))
        x0 = int(rng.integers(0, photo.width - width + 1))
        y0 = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((x0, y0, x0 + width, y0 + height))
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop

    return draw


def jpeg_files(folder: Path) -> list[str]:
    """The JPEG files in the class sub-folders of `folder`, sorted."""
    return sorted(str(p) for p in Path(folder).glob("*/*") if p.is_file() and p.suffix.lower() in JPEG_SUFFIXES)


# --- the sources ---------------------------------------------------------------------------------


def _image_data_generator_class():
    """Keras 3 keeps the legacy ImageDataGenerator in keras.src.legacy (exported as tf.keras'); Keras 2 in
    keras.preprocessing.image."""
    import keras

    cls = getattr(getattr(getattr(keras, "preprocessing", None), "image", None), "ImageDataGenerator", None)
    if cls is None:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator as cls
    return cls


def seed_image_data_generator(folder: Path, image_size: int, batch_size: int, seed: int = 0):
    """keras' legacy `ImageDataGenerator(...).flow_from_directory(...)` with the VOC seed's augmentation.

    Returns the (infinite) DirectoryIterator of (images float32 in [0, 1], sparse labels) batches.
    """
    if importlib.util.find_spec("scipy") is None:
        raise ImportError("ImageDataGenerator's shear and zoom need scipy (scipy.ndimage), which is not installed")
    generator = _image_data_generator_class()(
        rescale=1.0 / 255,
        width_shift_range=0.2,
        height_shift_range=0.2,
        shear_range=0.2,
        zoom_range=0.2,
        horizontal_flip=True,
    )
    return generator.flow_from_directory(
        str(folder),
        target_size=(image_size, image_size),
        batch_size=batch_size,
        class_mode="sparse",
        seed=seed,
    )


def keras_image_dataset(folder: Path, image_size: int, batch_size: int, seed: int = 0) -> tf.data.Dataset:
    """`keras.utils.image_dataset_from_directory`, shuffled, prefetched: (images float32 0–255, int labels)."""
    import keras

    ds = keras.utils.image_dataset_from_directory(
        str(folder),
        image_size=(image_size, image_size),
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def decode_only(folder: Path, batch_size: int) -> tf.data.Dataset:
    """JPEG decoding alone, in parallel: every file read and decoded to uint8 RGB at its own size.

    The decoded pixels are dropped after decoding: each element is the image's shape [height, width, 3]
    (which needs the decode to have run), batched into int32 [batch, 3]. Batching the pixels instead
    (`ragged_batch`, as the sizes differ) costs about half the throughput here, in copies no training
    pipeline makes, so this row stays a ceiling for decoding JPEGs on the machine.
    """
    files = jpeg_files(folder)
    if not files:
        raise ValueError(f"no JPEG files in the class sub-folders of {folder}")

    def decoded_shape(path):
        return tf.shape(tf.io.decode_jpeg(tf.io.read_file(path), channels=3))

    ds = tf.data.Dataset.from_tensor_slices(files).map(decoded_shape, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# --- timing --------------------------------------------------------------------------------------


def _batch_len(batch) -> int:
    """Images in a batch: the first dimension of the batch, or of its first element if a tuple/list/dict."""
    x = batch
    if isinstance(x, Mapping):
        x = next(iter(x.values()))
    elif isinstance(x, (tuple, list)):
        x = x[0]
    n = x.shape[0]
    if n is None:
        n = x.nrows() if isinstance(x, tf.RaggedTensor) else tf.shape(x)[0]
    return int(n)


def images_per_sec(source: Iterable, n_images: int, warmup_batches: int = 2) -> float:
    """Images per second of iterating `source` (a tf.data.Dataset, a keras iterator or any batch iterable).

    `warmup_batches` batches are drawn untimed; then batches are drawn until at least `n_images` images
    have been counted, or the source ends. tf.data batches are not converted to numpy.
    """
    rate, _ = _measure(source, n_images, warmup_batches)
    return rate


def _measure(source: Iterable, n_images: int, warmup_batches: int) -> tuple[float, int]:
    if n_images < 1:
        raise ValueError(f"n_images must be positive; received {n_images}")
    it = iter(source)
    for _ in range(warmup_batches):
        if next(it, None) is None:
            raise ValueError(f"the source ended within its {warmup_batches} warm-up batches")
    count = 0
    start = time.perf_counter()
    for batch in it:
        count += _batch_len(batch)
        if count >= n_images:
            break
    elapsed = time.perf_counter() - start
    del it  # stop a tf.data iterator's background prefetching before the next source is timed
    if count == 0:
        raise ValueError("the source yielded no batch after its warm-up")
    return count / elapsed, count


def run(
    folder: Path,
    ours: Callable[[], tf.data.Dataset] | None,
    *,
    image_size: int = 224,
    batch_size: int = 32,
    n_images: int | Mapping[str, int] | None = None,
    repeats: int = 1,
    warmup_batches: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Time every source on `folder`; rows {"name", "images_per_sec", "ratio", "images", "runs"}.

    `n_images`: images timed per source and repeat: None for as many as the folder holds, an int for
    all sources, or a mapping from row name to count (a cap for the slow generator, say); sources
    missing from the mapping time as many as the folder holds. tf.data sources are repeated, so that
    they reach the count even when warm-up batches were drawn from the first epoch.

    `ratio` is ours' images/s / the row's (1.0 on ours' row); None when `ours` is None.
    `images` is the count timed in the last repeat, `runs` each repeat's images/s.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be positive; received {repeats}")
    folder = Path(folder)
    n_files = len(jpeg_files(folder))
    if n_files == 0:
        raise ValueError(f"no JPEG files in the class sub-folders of {folder}")

    factories: dict[str, Callable[[], Iterable]] = {}
    if ours is not None:
        factories[OURS] = ours
    factories[GENERATOR] = lambda: seed_image_data_generator(folder, image_size, batch_size, seed)
    factories[KERAS_DATASET] = lambda: keras_image_dataset(folder, image_size, batch_size, seed)
    factories[DECODE_ONLY] = lambda: decode_only(folder, batch_size)

    def count_for(name: str) -> int:
        if n_images is None:
            return n_files
        if isinstance(n_images, Mapping):
            unknown = set(n_images) - set(NAMES)
            if unknown:
                raise ValueError(f"n_images: unknown sources {sorted(unknown)}; allowed: {', '.join(NAMES)}")
            return int(n_images.get(name, n_files))
        return int(n_images)

    runs: dict[str, list[float]] = {name: [] for name in factories}
    counted: dict[str, int] = {}
    for r in range(1, repeats + 1):
        for name, factory in factories.items():
            source = factory()
            if isinstance(source, tf.data.Dataset):
                source = source.repeat()
            rate, counted[name] = _measure(source, count_for(name), warmup_batches)
            runs[name].append(rate)
            log.info(
                "benchmark input: %s round %d/%d: %.1f images/s (%d images)", name, r, repeats, rate, counted[name]
            )
            del source
            gc.collect()

    rows: list[dict[str, Any]] = []
    for name in factories:
        rows.append(
            {
                "name": name,
                "images_per_sec": statistics.median(runs[name]),
                "ratio": None,
                "images": counted[name],
                "runs": runs[name],
            }
        )
    if ours is not None:
        ours_rate = rows[0]["images_per_sec"]
        for row in rows:
            row["ratio"] = ours_rate / row["images_per_sec"]
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows as a table: source, images timed, images/s, and how many times faster ours is."""
    width = max(len("source"), *(len(r["name"]) for r in rows))
    header = f"{'source':<{width}}  {'images':>6}  {'images/s':>9}  {'ours is':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        images = str(r["images"]) if r.get("images") is not None else ""
        lines.append(f"{r['name']:<{width}}  {images:>6}  {r['images_per_sec']:>9.1f}  {ratio:>8}")
    return "\n".join(lines)


def compare(
    images: Path | None,
    *,
    count: int = 1000,
    image_size: int = 224,
    batch_size: int = 32,
    max_shorter_side: int = 256,
    generator_images: int = 320,
    repeats: int = 2,
    work_dir: Path | None = None,
    photos: bool = False,
) -> list[dict]:
    """Shard `images` (or `count` generated JPEGs) with our stages and time our training pipeline
    (random-resized-crop + flip, the ImageNet recipe) against the references, in one run."""
    from resnet_pipeline.benchmark.harness import work_folder
    from resnet_pipeline.config import ShardConfig, SplitConfig
    from resnet_pipeline.data.pipeline import Preprocess, make_dataset
    from resnet_pipeline.data.shard import shard
    from resnet_pipeline.data.split import split

    with work_folder(work_dir, "bench-input-") as work:
        if images is None:
            images = make_jpeg_folder(work / "raw" / "images", count, photos=photos)
        images = Path(images)
        split(SplitConfig(), 42, images, work / "manifest.parquet", work / "labels.json")
        index = shard(
            ShardConfig(max_shorter_side=max_shorter_side, target_shard_mb=8),
            work / "manifest.parquet",
            images.parent,
            work / "shards",
        )
        files = [str(work / "shards" / e["file"]) for e in index["shards"]]
        prep = Preprocess(image_size, augment="imagenet", random_flip=True)
        n = len(jpeg_files(images))
        counts = {OURS: n, GENERATOR: min(generator_images, n), KERAS_DATASET: n, DECODE_ONLY: n}
        return run(
            images,
            lambda: make_dataset(files, batch_size, prep, training=True),
            image_size=image_size,
            batch_size=batch_size,
            n_images=counts,
            repeats=repeats,
        )
