"""Records built without TensorFlow equal TensorFlow's; odd and broken images are checked, converted
or excluded with their reason; sharding is byte-identical whatever the number of workers."""

from __future__ import annotations

import collections
import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from resnet_pipeline.config import ShardConfig, SplitConfig
from resnet_pipeline.data.contracts import read_manifest
from resnet_pipeline.data.images import inspect, prepare
from resnet_pipeline.data.records import encode_example
from resnet_pipeline.data.shard import shard
from resnet_pipeline.data.split import split

SEED = 42


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def photo(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8), "RGB")


# --- records ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_encode_example_equals_tensorflows_deterministic_serialization(seed):
    rng = np.random.default_rng(seed)
    features = {
        "image/encoded": rng.bytes(int(rng.integers(0, 3000))),
        "image/format": b"jpeg",
        "image/class/label": int(rng.integers(0, 2**40)),
        "image/class/text": "chat noir é".encode(),
        "image/height": int(rng.integers(0, 200)),
        "image/width": 0,
        "image/filename": b"x/y.jpg",
        "image/sha256": rng.bytes(32).hex().encode(),
        "a": -5,
    }
    tf_features = {
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        if isinstance(v, bytes)
        else tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
        for k, v in features.items()
    }
    expected = tf.train.Example(features=tf.train.Features(feature=tf_features)).SerializeToString(deterministic=True)
    assert encode_example(features) == expected


# --- images: each odd or broken input ---------------------------------------------------------


def odd_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, expected status prefix)."""
    rgb = photo()
    jpeg = encode(rgb, "JPEG", quality=90)
    sixteen = Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16))
    rgba = rgb.convert("RGBA")
    return {
        "good.jpg": (jpeg, "ok"),
        "gray.jpg": (encode(rgb.convert("L"), "JPEG"), "ok"),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), "ok"),
        "palette.png": (encode(rgb.convert("P"), "PNG"), "ok"),
        "alpha.png": (encode(rgba, "PNG"), "ok"),
        "sixteen_bit.png": (encode(sixteen, "PNG"), "ok"),
        "png_named.jpg": (encode(rgb, "PNG"), "ok"),
        "anim.gif": (encode(rgb.convert("P"), "GIF"), "ok"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "garbage.jpg": (np.random.default_rng(1).bytes(500), "not an image"),
        "notes.txt": (b"some notes, not an image\n", "not an image"),
        "tiny.png": (encode(photo(5, 30), "PNG"), "too small"),
    }


def test_inspect_names_what_is_wrong_with_each_file():
    for name, (data, expected) in odd_files().items():
        found = inspect(data, min_side=8)
        assert found.status.startswith(expected), (name, found)
        if expected == "ok":
            assert (found.width, found.height) == (48, 40), name
    assert inspect(odd_files()["png_named.jpg"][0]).format == "PNG"


def test_prepare_gives_rgb_that_tensorflow_decodes_and_keeps_native_files():
    for name, (data, expected) in odd_files().items():
        if expected != "ok":
            continue
        out = prepare(data)
        image = tf.io.decode_image(out.data, channels=3, expand_animations=False).numpy()
        assert image.shape == (40, 48, 3), name
        assert out.format == ("jpeg" if out.data[:2] == b"\xff\xd8" else "png"), name
        if name in ("good.jpg", "gray.jpg", "png_named.jpg"):
            assert out.data == data, f"{name}: a native file is stored as it is"
    sixteen = tf.io.decode_image(prepare(odd_files()["sixteen_bit.png"][0]).data, channels=3).numpy()
    assert sixteen.max() > 200, "16-bit values are scaled to 8 bits, not clipped"


def test_prepare_caps_the_shorter_side_deterministically():
    data = encode(photo(500, 375), "JPEG", quality=90)
    out = prepare(data, max_shorter_side=256)
    assert (out.width, out.height) == (341, 256) and out.format == "jpeg"
    assert prepare(data, max_shorter_side=256).data == out.data
    assert prepare(data, max_shorter_side=400).data == data, "smaller than the cap: unchanged"


# --- split and shard of a folder holding all of them -------------------------------------------


@pytest.fixture()
def odd_folder(tmp_path):
    folder = tmp_path / "raw" / "odd"
    for c, class_name in enumerate(("cat", "dog")):
        (folder / class_name).mkdir(parents=True)
        for name, (data, _) in odd_files().items():
            (folder / class_name / name).write_bytes(data)
        for i in range(6):
            (folder / class_name / f"extra_{i}.jpg").write_bytes(encode(photo(seed=10 * c + i + 1), "JPEG"))
    (folder / "dog" / "same_as_a_cat.jpg").write_bytes((folder / "cat" / "extra_0.jpg").read_bytes())
    return folder


def test_odd_folder_splits_with_each_status_and_shards_only_usable_images(odd_folder, tmp_path, caplog):
    manifest = tmp_path / "data" / "manifest.parquet"
    with caplog.at_level(logging.INFO):
        split(SplitConfig(min_side=8), SEED, odd_folder, manifest, tmp_path / "data" / "labels.json")
    rows = {r["path"]: r for r in read_manifest(manifest).to_pylist()}
    for name, (_, expected) in odd_files().items():
        assert rows[f"odd/cat/{name}"]["status"].startswith(expected), name
    # the summary: each reason counted, the duplicate filed under two classes reported
    assert "excluded 2 file(s): truncated" in caplog.text
    assert "excluded 4 file(s): not an image" in caplog.text
    assert "identical image under classes ['cat', 'dog']" in caplog.text
    dup = [r for p, r in rows.items() if p.endswith(("cat/extra_0.jpg", "dog/same_as_a_cat.jpg"))]
    assert dup[0]["split"] == dup[1]["split"]

    shards = tmp_path / "data" / "shards"
    index = shard(ShardConfig(workers=1), manifest, tmp_path / "raw", shards)
    ok = collections.Counter(r["split"] for r in rows.values() if r["status"] == "ok")
    assert {s: v["records"] for s, v in index["splits"].items()} == {s: ok[s] for s in ("train", "val", "test")}
    for entry in index["shards"]:
        for record in tf.data.TFRecordDataset(str(shards / entry["file"])):
            ex = tf.io.parse_single_example(record, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
            assert tf.io.decode_image(ex["image/encoded"], channels=3).shape[-1] == 3


def test_two_workers_write_the_same_bytes_as_one(odd_folder, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    split(SplitConfig(), SEED, odd_folder, manifest, tmp_path / "labels.json")
    cfg = dict(target_shard_mb=0.002, max_shorter_side=24)
    one = shard(ShardConfig(workers=1, **cfg), manifest, tmp_path / "raw", tmp_path / "one")
    two = shard(ShardConfig(workers=2, **cfg), manifest, tmp_path / "raw", tmp_path / "two")
    assert one == two and len(one["shards"]) > 3
    for entry in one["shards"]:
        assert (tmp_path / "one" / entry["file"]).read_bytes() == (tmp_path / "two" / entry["file"]).read_bytes()


def test_a_class_left_without_usable_images_and_too_few_classes_are_errors(tmp_path):
    folder = tmp_path / "raw" / "ds"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    (folder / "cat" / "a.jpg").write_bytes(encode(photo(), "JPEG"))
    (folder / "dog" / "b.jpg").write_bytes(b"")
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"the previous manifest")
    with pytest.raises(ValueError, match=r"\['dog'\] hold no usable image"):
        split(SplitConfig(), SEED, folder, manifest, tmp_path / "labels.json")
    assert manifest.read_bytes() == b"the previous manifest", "what was there is kept"
    (folder / "dog" / "b.jpg").unlink()
    (folder / "dog").rmdir()
    with pytest.raises(ValueError, match=r"found 1 class folder\(s\) \['cat'\]; expected at least 2"):
        split(SplitConfig(), SEED, folder, manifest, tmp_path / "labels.json")


def test_tfrecord_files_equal_tensorflows_writer_and_read_back(tmp_path):
    from resnet_pipeline.data.records import write_tfrecord

    rng = np.random.default_rng(3)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 5000, 20)] + [b""]
    assert write_tfrecord(tmp_path / "ours.tfrecord", records) == len(records)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for r in records:
            writer.write(r)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == records
