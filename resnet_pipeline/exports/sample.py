"""Seeded samples of a split of the shards, decoded and preprocessed as the evaluate stage does: the
int8 calibration images (train split) and the images each export is checked on (test split).

The records are drawn by position, without replacement, from a generator seeded by `seed`; a shard
is read only up to its last drawn record, and its sha256 is checked against index.json before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from resnet_pipeline.data.contracts import INDEX, ContractError, check_index
from resnet_pipeline.data.pipeline import Preprocess, eval_image, parse_example
from resnet_pipeline.fileio import read_json, recover_dir, sha256_file


def sample_split(
    shards_dir: str | Path, split: str, count: int, prep: Preprocess, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 images [n, S, S, 3], int32 labels [n]) of `count` records of `split` (all of them if the
    split has no more), in the order of the shards."""
    shards_dir = Path(shards_dir)
    recover_dir(shards_dir)
    entries = check_index(read_json(shards_dir / INDEX, "shard index"), shards_dir, split, verify_hashes=False)
    total = sum(int(e["records"]) for e in entries)
    if total == 0:
        raise ValueError(f"{shards_dir / INDEX}: no records in split {split!r}")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    records: list[bytes] = []
    start = 0
    for entry in entries:
        end = start + int(entry["records"])
        wanted = set((chosen[(chosen >= start) & (chosen < end)] - start).tolist())
        start = end
        if not wanted:
            continue
        path = shards_dir / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            raise ContractError(f"{path}: sha256 differs from index.json's; rerun the shard stage")
        reader = tf.data.TFRecordDataset(str(path)).take(max(wanted) + 1).as_numpy_iterator()
        found = [record for position, record in enumerate(reader) if position in wanted]
        if len(found) != len(wanted):
            raise ContractError(f"{path}: holds fewer records than index.json lists; rerun the shard stage")
        records.extend(found)

    def decode(record):
        encoded, label = parse_example(record)
        return eval_image(encoded, prep), label

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in ds))
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)
