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
    assert len({o.tobytes() for o in outs}) == len(outs), "every seed gives another image"
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
