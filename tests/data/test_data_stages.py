"""The data stages on real images: download -> split -> shard, and the tf.data pipeline over the shards."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from resnet_pipeline.config import DownloadConfig, ShardConfig, SplitConfig
from resnet_pipeline.data import pipeline
from resnet_pipeline.data.contracts import INDEX, read_manifest
from resnet_pipeline.data.download import download
from resnet_pipeline.data.pipeline import Preprocess
from resnet_pipeline.data.shard import shard
from resnet_pipeline.data.split import split

SEED = 42
DESIGN_COLUMNS = ["path", "label", "label_name", "split", "sha256", "width", "height", "bytes", "status"]
SPLITS = ("train", "val", "test")
RECORD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/text": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
    "image/sha256": tf.io.FixedLenFeature([], tf.string),
}


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def random_png(rng: np.random.Generator, size: int = 8) -> bytes:
    return png_bytes(rng.integers(0, 256, size=(size, size)))


def manifest_rows(path: Path) -> list[dict]:
    return read_manifest(path).to_pylist()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small_image_folder(root: Path, per_class: int = 6, classes=("cat", "dog")) -> Path:
    """root/pets/<class>/img_NN.png with distinct random 8x8 images."""
    rng = np.random.default_rng(7)
    folder = root / "pets"
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            (folder / name / f"img_{i:02d}.png").write_bytes(random_png(rng))
    return folder


# --- download ----------------------------------------------------------------------------------


def test_download_writes_1797_pngs_in_10_class_folders(digits_data):
    folder = digits_data.raw / "digits"
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert classes == [str(i) for i in range(10)]
    pngs = list(folder.glob("*/*.png"))
    assert len(pngs) == 1797
    per_class = collections.Counter(p.parent.name for p in pngs)
    assert all(150 <= n <= 200 for n in per_class.values()), per_class
    with Image.open(pngs[0]) as img:
        assert img.size == (8, 8) and img.mode == "L"
    # no half-written temporary folders left beside the dataset
    assert [p.name for p in digits_data.raw.iterdir()] == ["digits"]


def test_download_is_idempotent(digits_data):
    folder = digits_data.raw / "digits"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert download(DownloadConfig(), digits_data.raw) == folder
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert after == before, "a complete download is reused, not rewritten"
    assert [p.name for p in digits_data.raw.iterdir()] == ["digits"]


def test_download_replaces_an_incomplete_folder(tmp_path):
    raw = tmp_path / "raw"
    (raw / "digits" / "3").mkdir(parents=True)
    (raw / "digits" / "3" / "junk.png").write_bytes(b"half")  # an interrupted earlier attempt
    folder = download(DownloadConfig(), raw)
    assert not (folder / "3" / "junk.png").exists()
    assert len(list(folder.glob("*/*.png"))) == 1797
    assert sorted(p.name for p in raw.iterdir()) == ["digits"]


# --- split ---------------------------------------------------------------------------------


def test_manifest_has_the_design_columns_and_one_row_per_image(digits_data):
    table = pq.read_table(digits_data.manifest)
    assert table.column_names == DESIGN_COLUMNS
    rows = table.to_pylist()
    assert len(rows) == 1797
    assert {r["status"] for r in rows} == {"ok"}
    labels = json.loads(digits_data.labels.read_text())["classes"]
    assert labels == [str(i) for i in range(10)]
    for row in rows[::97]:
        file = digits_data.raw / row["path"]
        data = file.read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["bytes"] == len(data)
        assert (row["width"], row["height"]) == (8, 8)
        assert row["label_name"] == file.parent.name == labels[row["label"]]
        assert row["split"] in SPLITS


def test_split_ratios_hold_per_class(digits_data):
    rows = manifest_rows(digits_data.manifest)
    by_class = collections.defaultdict(collections.Counter)
    for r in rows:
        by_class[r["label_name"]][r["split"]] += 1
    assert len(by_class) == 10
    for name, counts in by_class.items():
        total = sum(counts.values())
        assert 0.65 <= counts["train"] / total <= 0.92, (name, counts)
        assert counts["val"] >= 1 and counts["test"] >= 1, (name, counts)
    overall = collections.Counter(r["split"] for r in rows)
    assert 0.75 <= overall["train"] / len(rows) <= 0.85, overall
    assert 0.06 <= overall["val"] / len(rows) <= 0.14, overall
    assert 0.06 <= overall["test"] / len(rows) <= 0.14, overall


def test_split_depends_on_the_seed(tmp_path, digits_data):
    other = split(SplitConfig(), SEED + 1, digits_data.raw / "digits", tmp_path / "m.parquet", tmp_path / "l.json")
    a = {r["path"]: r["split"] for r in manifest_rows(digits_data.manifest)}
    b = {r["path"]: r["split"] for r in other.to_pylist()}
    assert a.keys() == b.keys()
    moved = sum(a[p] != b[p] for p in a)
    assert moved > 100, "another seed draws another split"


@pytest.fixture(scope="module")
def enlarged(digits_data, tmp_path_factory):
    """A copy of the digits with duplicates, new images and broken files added, split again."""
    root = tmp_path_factory.mktemp("enlarged")
    raw = root / "raw"
    shutil.copytree(digits_data.raw / "digits", raw / "digits")
    original = manifest_rows(digits_data.manifest)
    # one duplicate (under a new name, same class) of an image from each split
    duplicates = {}
    for s in SPLITS:
        row = next(r for r in original if r["split"] == s)
        src = raw / row["path"]
        copy = src.with_name(f"copy_of_{src.name}")
        shutil.copyfile(src, copy)
        duplicates[copy.relative_to(raw).as_posix()] = row
    # 60 new images
    rng = np.random.default_rng(123)
    added = []
    for i in range(60):
        file = raw / "digits" / str(i % 10) / f"new_{i:03d}.png"
        file.write_bytes(random_png(rng))
        added.append(file.relative_to(raw).as_posix())
    # broken files: an empty one and a text file named .png
    (raw / "digits" / "4" / "empty.png").write_bytes(b"")
    (raw / "digits" / "7" / "not_an_image.png").write_text("this is not a PNG\n")
    manifest = root / "manifest.parquet"
    table = split(SplitConfig(), SEED, raw / "digits", manifest, root / "labels.json")
    return {
        "root": root,
        "raw": raw,
        "manifest": manifest,
        "rows": {r["path"]: r for r in table.to_pylist()},
        "original": {r["path"]: r for r in original},
        "duplicates": duplicates,
        "added": added,
    }


def test_split_is_decided_by_content_duplicates_share_a_split(enlarged):
    rows = enlarged["rows"]
    splits_seen = set()
    for copy_path, original in enlarged["duplicates"].items():
        assert rows[copy_path]["sha256"] == original["sha256"]
        assert rows[copy_path]["split"] == original["split"], copy_path
        assert rows[copy_path]["label"] == original["label"]
        splits_seen.add(original["split"])
    assert splits_seen == set(SPLITS)


def test_adding_images_does_not_move_existing_ones(enlarged):
    rows, original = enlarged["rows"], enlarged["original"]
    assert set(original) <= set(rows)
    moved = [p for p, r in original.items() if rows[p]["split"] != r["split"]]
    assert moved == []
    for path in enlarged["added"]:
        assert rows[path]["status"] == "ok" and rows[path]["split"] in SPLITS
    assert len(rows) == 1797 + 3 + 60 + 2


def test_broken_files_are_recorded_not_fatal(enlarged):
    rows = enlarged["rows"]
    empty = rows["digits/4/empty.png"]
    assert empty["status"] != "ok" and empty["bytes"] == 0
    text = rows["digits/7/not_an_image.png"]
    assert text["status"] != "ok" and text["bytes"] > 0
    assert sum(r["status"] != "ok" for r in rows.values()) == 2


def test_shard_skips_broken_files(enlarged, tmp_path):
    index = shard(ShardConfig(), enlarged["manifest"], enlarged["raw"], tmp_path / "shards")
    ok = collections.Counter(r["split"] for r in enlarged["rows"].values() if r["status"] == "ok")
    assert {s: index["splits"][s]["records"] for s in SPLITS} == dict(ok)
    filenames = set()
    for entry in index["shards"]:
        for record in tf.data.TFRecordDataset(str(tmp_path / "shards" / entry["file"])):
            filenames.add(tf.io.parse_single_example(record, RECORD_FEATURES)["image/filename"].numpy().decode())
    assert "digits/4/empty.png" not in filenames and "digits/7/not_an_image.png" not in filenames
    assert len(filenames) == sum(ok.values())


def test_class_with_only_broken_files_is_refused(tmp_path):
    folder = small_image_folder(tmp_path)
    broken = folder / "broken_class"
    broken.mkdir()
    (broken / "empty.png").write_bytes(b"")
    (broken / "text.png").write_text("not an image")
    manifest = tmp_path / "manifest.parquet"
    with pytest.raises(ValueError) as err:
        split(SplitConfig(), SEED, folder, manifest, tmp_path / "labels.json")
    assert "broken_class" in str(err.value)
    assert "cat" not in str(err.value) and "dog" not in str(err.value)
    assert not manifest.exists(), "nothing is written when the split is refused"


def test_split_of_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        split(SplitConfig(), SEED, tmp_path / "nowhere", tmp_path / "m.parquet", tmp_path / "l.json")


# --- shard ---------------------------------------------------------------------------------


def _index(shards_dir: Path) -> dict:
    return json.loads((shards_dir / INDEX).read_text())


def test_index_counts_match_manifest(digits_data):
    index = _index(digits_data.shards)
    ok = collections.Counter(r["split"] for r in manifest_rows(digits_data.manifest) if r["status"] == "ok")
    assert set(index["splits"]) == set(SPLITS)
    for s in SPLITS:
        assert index["splits"][s]["records"] == ok[s]
        entries = [e for e in index["shards"] if e["split"] == s]
        size_mb = (
            sum(r["bytes"] for r in manifest_rows(digits_data.manifest) if r["status"] == "ok" and r["split"] == s)
            / 2**20
        )
        expected = max(1, min(ok[s], math.ceil(size_mb / ShardConfig().target_shard_mb)))
        assert len(entries) == index["splits"][s]["shards"] == expected
        assert sum(e["records"] for e in entries) == ok[s]
    listed = {e["file"] for e in index["shards"]} | {INDEX}
    assert {p.name for p in digits_data.shards.iterdir()} == listed


def test_shard_files_match_index_checksums_and_record_counts(digits_data):
    for entry in _index(digits_data.shards)["shards"]:
        file = digits_data.shards / entry["file"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"], entry["file"]
        assert sum(1 for _ in tf.data.TFRecordDataset(str(file))) == entry["records"], entry["file"]


def test_records_carry_the_model_garden_keys(digits_data):
    labels = json.loads(digits_data.labels.read_text())["classes"]
    manifest = {r["path"]: r for r in manifest_rows(digits_data.manifest)}
    seen = collections.defaultdict(set)
    for entry in _index(digits_data.shards)["shards"]:
        for record in tf.data.TFRecordDataset(str(digits_data.shards / entry["file"])):
            ex = {k: v.numpy() for k, v in tf.io.parse_single_example(record, RECORD_FEATURES).items()}
            filename = ex["image/filename"].decode()
            row = manifest[filename]
            assert hashlib.sha256(ex["image/encoded"]).hexdigest() == ex["image/sha256"].decode() == row["sha256"]
            assert ex["image/encoded"] == (digits_data.raw / filename).read_bytes()
            assert ex["image/format"] == b"png"
            assert ex["image/class/label"] == row["label"]
            assert ex["image/class/text"].decode() == labels[row["label"]]
            assert (ex["image/height"], ex["image/width"]) == (8, 8)
            assert row["split"] == entry["split"]
            seen[entry["split"]].add(filename)
    for s in SPLITS:
        assert seen[s] == {p for p, r in manifest.items() if r["split"] == s}


def test_shard_twice_gives_byte_identical_files(digits_data, tmp_path):
    shard(ShardConfig(), digits_data.manifest, digits_data.raw, tmp_path / "again")
    assert tree_bytes(tmp_path / "again") == tree_bytes(digits_data.shards)


SHARD_SCRIPT = """
import sys
from resnet_pipeline.config import ShardConfig
from resnet_pipeline.data.shard import shard
shard(ShardConfig(), sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_shard_in_another_process_gives_byte_identical_files(digits_data, tmp_path):
    """DVC caches shards by content: a rerun in a fresh interpreter must write the same bytes.

    (Protobuf map fields serialize in a per-process hash order unless serialized deterministically.)
    """
    out = tmp_path / "other_process"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(
        [sys.executable, "-c", SHARD_SCRIPT, str(digits_data.manifest), str(digits_data.raw), str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert tree_bytes(out) == tree_bytes(digits_data.shards)


def test_shard_refuses_a_file_changed_since_split_and_keeps_old_shards(tmp_path):
    folder = small_image_folder(tmp_path / "raw")
    manifest = tmp_path / "data" / "manifest.parquet"
    split(SplitConfig(), SEED, folder, manifest, tmp_path / "data" / "labels.json")
    shards_dir = tmp_path / "data" / "shards"
    shard(ShardConfig(target_shard_mb=1e-5), manifest, tmp_path / "raw", shards_dir)
    before = tree_bytes(shards_dir)
    assert INDEX in before and len(before) > 2

    changed = folder / "dog" / "img_03.png"
    changed.write_bytes(png_bytes(np.full((8, 8), 200)))  # still a valid image, other content
    with pytest.raises(ValueError) as err:
        shard(ShardConfig(target_shard_mb=1e-5), manifest, tmp_path / "raw", shards_dir)
    assert "img_03.png" in str(err.value) and "dog" in str(err.value)
    assert tree_bytes(shards_dir) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["labels.json", "manifest.parquet", "shards"]


def test_shard_without_manifest_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        shard(ShardConfig(), tmp_path / "manifest.parquet", tmp_path / "raw", tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


# --- pipeline ------------------------------------------------------------------------------


def test_train_dataset_batches(digits_data):
    files, n_train = pipeline.shard_files(digits_data.shards, "train")
    assert len(files) == _index(digits_data.shards)["splits"]["train"]["shards"]
    batch = 64
    ds = pipeline.make_dataset(files, batch, Preprocess(32, augment="cifar", pad_crop=4), training=True, seed=1)
    batches = 0
    for images, labels in ds:
        batches += 1
        assert images.shape == (batch, 32, 32, 3)
        assert images.dtype == tf.float32
        assert labels.shape == (batch,) and labels.dtype == tf.int32
        x = images.numpy()
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.max() > 0.5, "images are not blank"
        assert set(labels.numpy().tolist()) <= set(range(10))
    assert batches == n_train // batch, "the last partial batch is dropped"


def test_train_dataset_order_is_a_function_of_the_seed(digits_data):
    files, _ = pipeline.shard_files(digits_data.shards, "train")

    def labels(seed):
        ds = pipeline.make_dataset(files, 128, Preprocess(8), training=True, seed=seed)
        return np.concatenate([y.numpy() for _, y in ds.take(4)])

    a, b, c = labels(5), labels(5), labels(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_eval_dataset_keeps_every_record(digits_data):
    files, n_test = pipeline.shard_files(digits_data.shards, "test")
    batch = 64 if n_test % 64 else 61  # a batch size that leaves a partial last batch
    ds = pipeline.make_dataset(files, batch, Preprocess(32), training=False)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert len(labels) == n_test, "the partial last batch is kept"
    expected = collections.Counter(r["label"] for r in manifest_rows(digits_data.manifest) if r["split"] == "test")
    assert collections.Counter(labels.tolist()) == expected
    first = np.concatenate([x.numpy() for x, _ in ds])
    second = np.concatenate([x.numpy() for x, _ in ds])
    np.testing.assert_array_equal(first, second)  # no augmentation, no shuffling


def test_shard_files_of_unknown_split(digits_data):
    with pytest.raises(ValueError, match="'holdout'"):
        pipeline.shard_files(digits_data.shards, "holdout")


def _one_record(digits_data) -> tuple[bytes, dict]:
    entry = _index(digits_data.shards)["shards"][0]
    record = next(iter(tf.data.TFRecordDataset(str(digits_data.shards / entry["file"]))))
    filename = tf.io.parse_single_example(record, RECORD_FEATURES)["image/filename"].numpy().decode()
    row = next(r for r in manifest_rows(digits_data.manifest) if r["path"] == filename)
    return record, row


def test_parse_example_returns_encoded_image_and_int32_label(digits_data):
    record, row = _one_record(digits_data)
    encoded, label = pipeline.parse_example(record)
    assert label.dtype == tf.int32 and int(label) == row["label"]
    assert encoded.numpy() == (digits_data.raw / row["path"]).read_bytes()


def test_eval_image_decodes_and_scales(digits_data):
    record, row = _one_record(digits_data)
    encoded, _ = pipeline.parse_example(record)
    with Image.open(digits_data.raw / row["path"]) as img:
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    native = pipeline.eval_image(encoded, 8).numpy()  # native size: no resampling
    assert native.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_allclose(native[..., channel], pixels, atol=1e-6)
    big = pipeline.eval_image(encoded, 32).numpy()
    assert big.shape == (32, 32, 3) and big.dtype == np.float32
    assert 0.0 <= big.min() and big.max() <= 1.0


def test_train_image_augments_and_eval_image_does_not(digits_data):
    encoded, _ = pipeline.parse_example(_one_record(digits_data)[0])
    plain = pipeline.eval_image(encoded, 32).numpy()
    np.testing.assert_array_equal(pipeline.eval_image(encoded, 32).numpy(), plain)
    seeds = [tf.constant([1, i], tf.int64) for i in range(16)]
    no_aug = pipeline.train_image(encoded, Preprocess(32, augment="none", random_flip=True), seeds[0]).numpy()
    np.testing.assert_allclose(no_aug, plain, atol=1e-6)
    cifar = Preprocess(32, augment="cifar", pad_crop=4)
    crops = [pipeline.train_image(encoded, cifar, s).numpy() for s in seeds[:8]]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert all(0.0 <= c.min() and c.max() <= 1.0 for c in crops)
    assert any(not np.allclose(c, plain) for c in crops), "pad-and-crop shifts the image"
    np.testing.assert_array_equal(pipeline.train_image(encoded, cifar, seeds[3]).numpy(), crops[3])  # stateless
    flip = Preprocess(32, augment="cifar", pad_crop=0, random_flip=True)
    flipped = [pipeline.train_image(encoded, flip, s).numpy() for s in seeds]
    assert any(np.allclose(f, plain[:, ::-1]) and not np.allclose(f, plain) for f in flipped)
