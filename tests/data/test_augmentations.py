"""Train and eval image functions: each augmentation, its determinism, eval crop and normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from resnet_pipeline.data.pipeline import Preprocess, eval_image, train_image


def encoded(fmt: str, width: int = 120, height: int = 90) -> tf.Tensor:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt, quality=95)
    return tf.constant(buf.getvalue())


SEEDS = [tf.constant([7, i], tf.int64) for i in range(12)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("augment", ["imagenet", "shift_shear_zoom", "cifar"])
def test_each_augmentation_varies_with_the_seed_and_repeats_with_it(fmt, augment):
    prep = Preprocess(64, augment=augment, pad_crop=6, random_flip=True)
    image = encoded(fmt)
    outs = [train_image(image, prep, s).numpy() for s in SEEDS]
    assert all(o.shape == (64, 64, 3) and o.dtype == np.float32 for o in outs)
    assert all(0.0 <= o.min() and o.max() <= 1.0 for o in outs)
    # cifar draws from 13 x 13 offsets x 2 flips: two seeds of 12 may share one (about a 1 in 5 chance)
    distinct = len({o.tobytes() for o in outs})
    assert distinct >= len(outs) - (1 if augment == "cifar" else 0), f"{distinct} distinct images of {len(outs)}"
    np.testing.assert_array_equal(train_image(image, prep, SEEDS[5]).numpy(), outs[5])


def test_imagenet_crop_of_a_jpeg_decodes_only_the_window_and_matches_the_png_path():
    prep = Preprocess(48, augment="imagenet")
    jpeg, png = encoded("JPEG"), encoded("PNG")
    for s in SEEDS[:4]:
        a, b = train_image(jpeg, prep, s).numpy(), train_image(png, prep, s).numpy()
        assert np.abs(a - b).mean() < 0.02, "same crop window, JPEG vs lossless source"


def test_seed_augmentation_stays_near_the_image():
    prep = Preprocess(64, augment="shift_shear_zoom")
    plain = eval_image(encoded("PNG"), Preprocess(64)).numpy()
    moved = [train_image(encoded("PNG"), prep, s).numpy() for s in SEEDS]
    diffs = [np.abs(m - plain).mean() for m in moved]
    assert all(0.0 < d < 0.25 for d in diffs), diffs


def test_eval_resizes_the_shorter_side_and_centre_crops():
    image = encoded("PNG", 120, 90)
    full = eval_image(image, Preprocess(45, eval_crop=1.0)).numpy()
    assert full.shape == (45, 45, 3)
    # the shorter side (90) -> 45: the centre 45 of the 60 columns; red grows left to right
    red = full[..., 0].mean(axis=0)
    assert red[0] > 0.1 and red[-1] < 0.9
    cropped = eval_image(image, Preprocess(45, eval_crop=0.5)).numpy()
    assert cropped.shape == (45, 45, 3)
    assert np.ptp(cropped[..., 0]) < np.ptp(full[..., 0]), "a tighter centre crop spans fewer columns"


def test_normalisation_uses_mean_and_std():
    image = encoded("PNG")
    plain = eval_image(image, Preprocess(32)).numpy()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = eval_image(image, Preprocess(32, mean=mean, std=std)).numpy()
    np.testing.assert_allclose(normed, (plain - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)


def test_an_unknown_augmentation_is_refused_not_skipped():
    """Release 0.1's `seed` (now `shift_shear_zoom`) must not fall through to no augmentation."""
    with pytest.raises(ValueError, match=r"augment: received 'seed'; allowed: 'cifar', 'imagenet', 'shift_shear_zoom'"):
        Preprocess(64, augment="seed")


@pytest.mark.parametrize("augment", ["imagenet", "shift_shear_zoom", "cifar"])
def test_a_batch_augments_each_image_as_alone_at_its_position(augment):
    """The pipeline augments per batch; an image's result depends on its position only, not on the
    batch, its place in it or the replica's slice of it (and matches `train_image` at that position)."""
    from resnet_pipeline.data.pipeline import _seed, _train_base, augment_batch, augment_key

    prep = Preprocess(48, augment=augment, pad_crop=5, random_flip=True)
    base = tf.constant([3, 0], tf.int64)
    sources = [encoded("JPEG", 80 + 7 * i, 60 + 3 * i) for i in range(6)]
    positions = tf.constant([11, 2, 40_000, 7, 3, 900], tf.int64)
    images = tf.stack([_train_base(e, prep, _seed(base, tf.cast(p, tf.int32))) for e, p in zip(sources, positions)])
    whole = augment_batch(images, positions, augment_key(base), prep).numpy()
    halves = [augment_batch(images[k : k + 3], positions[k : k + 3], augment_key(base), prep).numpy() for k in (0, 3)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    for j, source in enumerate(sources):
        np.testing.assert_array_equal(train_image(source, prep, base, int(positions[j])).numpy(), whole[j])
    assert len({w.tobytes() for w in whole}) == len(whole)


def test_the_per_position_numbers_are_uniform_and_independent():
    from resnet_pipeline.data.pipeline import _bits, augment_key

    key, positions = augment_key(tf.constant([42, 0], tf.int64)), tf.range(20_000, dtype=tf.int64)
    offsets = [(_bits(key, positions, draw).numpy() % 9).astype(int) for draw in (1, 2)]
    for values in offsets:
        shares = np.bincount(values, minlength=9) / len(values)
        assert np.all(np.abs(shares - 1 / 9) < 0.01), shares
    assert abs(np.corrcoef(offsets[0], offsets[1])[0, 1]) < 0.03, "the two offsets of an image are independent"
    assert abs(np.corrcoef(offsets[0][:-1], offsets[0][1:])[0, 1]) < 0.03, "neighbouring positions are independent"
    flips = _bits(key, positions, 8).numpy() >> 31
    assert 0.48 < flips.mean() < 0.52
    other = _bits(augment_key(tf.constant([43, 0], tf.int64)), positions, 1).numpy() % 9
    assert np.mean(other == offsets[0]) < 0.15, "another seed draws other numbers"
