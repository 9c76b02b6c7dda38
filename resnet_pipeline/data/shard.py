"""Shard stage: write each split of the manifest as TFRecord shards plus `shards/index.json`.

Records are `tf.train.Example`s with the Model Garden keys of design.md; shards are named
`SPLIT-NNNNN-of-MMMMM.tfrecord`. Records are ordered by content hash, so the same manifest gives
byte-identical shards. The shards are written into a temporary folder that replaces the old one
only when complete.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from resnet_pipeline.config import ShardConfig
from resnet_pipeline.data.split import read_manifest
from resnet_pipeline.fileio import atomic_write_json, sha256_bytes, sha256_file, staged_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INDEX = "index.json"


def _bytes(v: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))


def make_example(encoded: bytes, row: dict) -> bytes:
    fmt = Path(row["path"]).suffix.lstrip(".").lower().replace("jpg", "jpeg")
    features = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(fmt.encode()),
        "image/class/label": _int(row["label"]),
        "image/class/text": _bytes(row["label_name"].encode()),
        "image/height": _int(row["height"]),
        "image/width": _int(row["width"]),
        "image/filename": _bytes(row["path"].encode()),
        "image/sha256": _bytes(row["sha256"].encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def shard(cfg: ShardConfig, manifest_path: str | Path, raw_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the shards of every split; return the index (also written to `out_dir/index.json`)."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    rows = [r for r in read_manifest(manifest_path).to_pylist() if r["status"] == "ok"]
    index: dict = {"splits": {}, "shards": []}
    with staged_dir(out_dir) as tmp, tqdm(total=len(rows), desc="shard", unit="img", disable=None) as bar:
        for split in SPLITS:
            records = sorted((r for r in rows if r["split"] == split), key=lambda r: (r["sha256"], r["path"]))
            total = max(1, math.ceil(len(records) / cfg.records_per_shard))
            index["splits"][split] = {"records": len(records), "shards": total}
            for i in range(total):
                chunk = records[i * cfg.records_per_shard : (i + 1) * cfg.records_per_shard]
                name = shard_name(split, i, total)
                with tf.io.TFRecordWriter(str(tmp / name)) as writer:
                    for row in chunk:
                        data = (raw_dir / row["path"]).read_bytes()
                        if sha256_bytes(data) != row["sha256"]:
                            raise ValueError(
                                f"{raw_dir / row['path']}: content changed since the manifest was written "
                                f"(sha256 differs from the manifest's); rerun the split stage"
                            )
                        writer.write(make_example(data, row))
                        bar.update()
                index["shards"].append(
                    {"file": name, "split": split, "records": len(chunk), "sha256": sha256_file(tmp / name)}
                )
        atomic_write_json(tmp / INDEX, index)
    log.info("shard: %s", {s: v["records"] for s, v in index["splits"].items()})
    return index
