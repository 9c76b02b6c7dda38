"""The input-pipeline benchmark on a small folder of JPEGs: every source runs and yields what it should,
the rows and their ratios add up, the folder is deterministic."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from resnet_pipeline.benchmark.input import (
    DECODE_ONLY,
    GENERATOR,
    KERAS_DATASET,
    NAMES,
    OURS,
    decode_only,
    format_rows,
    images_per_sec,
    jpeg_files,
    keras_image_dataset,
    make_jpeg_folder,
    run,
    seed_image_data_generator,
)

N_IMAGES = 64
CLASSES = 4
SIZE = (120, 90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), n_images=N_IMAGES, size=SIZE, classes=CLASSES)


def digest(paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_folder_is_class_subfolders_of_jpegs_and_deterministic(folder, tmp_path):
    files = jpeg_files(folder)
    assert len(files) == N_IMAGES
    assert sorted(p.name for p in folder.iterdir()) == [f"c{c:02d}" for c in range(CLASSES)]
    for c in range(CLASSES):
        assert len(list((folder / f"c{c:02d}").glob("*.jpg"))) == N_IMAGES // CLASSES
    image = tf.io.decode_jpeg(tf.io.read_file(files[0]), channels=3)
    assert image.shape == (SIZE[1], SIZE[0], 3)
    assert float(tf.math.reduce_std(tf.cast(image, tf.float32))) > 5  # not a flat colour

    again = make_jpeg_folder(tmp_path / "again", n_images=N_IMAGES, size=SIZE, classes=CLASSES)
    assert digest(jpeg_files(again)) == digest(files)
    other = make_jpeg_folder(tmp_path / "other", n_images=N_IMAGES, size=SIZE, classes=CLASSES, seed=1)
    assert digest(jpeg_files(other)) != digest(files)


def test_generator_yields_augmented_images_of_the_size_in_unit_range(folder):
    it = seed_image_data_generator(folder, image_size=64, batch_size=16, seed=0)
    assert it.samples == N_IMAGES
    for _ in range(5):  # past the end of the first epoch: the iterator is infinite
        images, labels = next(it)
        assert images.shape == (16, 64, 64, 3) and images.dtype == np.float32
        assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.1
        assert labels.shape == (16,) and set(labels.astype(int)) <= set(range(CLASSES))


def test_decode_only_yields_every_file_decoded_at_its_size(folder):
    shapes = [batch.numpy() for batch in decode_only(folder, batch_size=10)]
    assert [len(s) for s in shapes] == [10] * 6 + [4]
    assert np.concatenate(shapes).tolist() == [[SIZE[1], SIZE[0], 3]] * N_IMAGES
    (folder / "c00" / "broken.jpg").write_bytes(b"not a jpeg")  # the files are decoded, not only listed
    try:
        with pytest.raises(tf.errors.InvalidArgumentError):
            for _ in decode_only(folder, batch_size=10):
                pass
    finally:
        (folder / "c00" / "broken.jpg").unlink()


def test_images_per_sec_counts_by_first_dimension_and_stops_at_n_images(folder):
    # finite tf.data: stops when the source ends; 2 warm-up batches of 16 leave 32 images timed
    assert images_per_sec(keras_image_dataset(folder, 32, 16), n_images=10_000) > 0
    # an infinite keras iterator: stops once n_images are counted
    it = seed_image_data_generator(folder, image_size=32, batch_size=8)
    assert images_per_sec(it, n_images=24, warmup_batches=1) > 0
    assert it.total_batches_seen == 1 + 3
    with pytest.raises(ValueError, match="warm-up"):
        images_per_sec(decode_only(folder, batch_size=64), n_images=1, warmup_batches=2)


def test_run_rows_and_ratios(folder):
    rows = run(folder, ours=lambda: keras_image_dataset(folder, 64, 16), image_size=64, batch_size=16)
    assert [r["name"] for r in rows] == list(NAMES)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        assert r["images_per_sec"] > 0 and math.isfinite(r["images_per_sec"])
        assert r["ratio"] == pytest.approx(by_name[OURS]["images_per_sec"] / r["images_per_sec"])
        assert r["runs"] == [r["images_per_sec"]]
    assert by_name[OURS]["ratio"] == 1.0
    for r in rows:  # the folder's count by default, reached across epochs after the warm-up batches
        assert r["images"] == N_IMAGES

    table = format_rows(rows)
    assert len(table.splitlines()) == 2 + len(NAMES)
    assert all(name in table for name in NAMES) and "1.00x" in table


@pytest.mark.slow
def test_run_without_ours_has_no_ratios_and_takes_the_median_of_repeats(folder):
    rows = run(folder, None, image_size=32, batch_size=16, n_images={GENERATOR: 16, DECODE_ONLY: 48}, repeats=3)
    assert [r["name"] for r in rows] == [GENERATOR, KERAS_DATASET, DECODE_ONLY]
    assert [r["images"] for r in rows] == [16, N_IMAGES, 48]
    for r in rows:
        assert r["ratio"] is None and len(r["runs"]) == 3
        assert r["images_per_sec"] == sorted(r["runs"])[1]
    assert "-" in format_rows(rows).splitlines()[-1]
    with pytest.raises(ValueError, match="unknown sources"):
        run(folder, None, image_size=32, batch_size=16, n_images={"ImageDataGenerator": 16})


@pytest.mark.slow
def test_benchmark_commands_print_their_figures(capsys, tmp_path):
    from resnet_pipeline import cli

    out_file = tmp_path / "shard.json"
    assert (
        cli.main(
            [
                "benchmark",
                "shard",
                "--count",
                "40",
                "--max-shorter-side",
                "64",
                "--repeats",
                "1",
                "--output",
                str(out_file),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "shards byte-identical: yes" in out and "speed-up:" in out
    figures = json.loads(out_file.read_text())
    assert figures["images"] == 40 and figures["byte_identical"] is True
    assert figures["speedup"] == pytest.approx(figures["seconds_1_worker"] / figures["seconds_2_workers"])

    assert (
        cli.main(
            [
                "benchmark",
                "input",
                "--count",
                "40",
                "--image-size",
                "64",
                "--batch-size",
                "8",
                "--generator-images",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for name in ("ours (TFRecord shards)", "ImageDataGenerator", "image_dataset_from_directory", "JPEG decode only"):
        assert name in out
    assert cli.main(["benchmark", "shard", "--workers", "1"]) == 2
    assert "--workers: received 1" in capsys.readouterr().err
