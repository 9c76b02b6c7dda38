"""Shard stage: write each split of the manifest as TFRecord shards plus `shards/index.json`.

Records are `tf.train.Example`s with the Model Garden keys of design.md; shards are named
`SPLIT-NNNNN-of-MMMMM.tfrecord`. A split gets as many shards as its bytes need at
`target_shard_mb` each, and its records, ordered by content hash, are dealt out in equal runs, so
the same manifest gives the same shards. A pool of `workers` processes writes whole shards, each
preparing its records in order (checked against the manifest's sha256, converted to RGB,
optionally shrunk), so the shards are byte-identical whatever the number of workers. The workers
import Pillow, not TensorFlow. The shards are written into a temporary folder that replaces the
old one only when complete.

With `workers` above 1, a script that calls `shard` must guard its entry point with
`if __name__ == "__main__":` (the workers are spawned, and import the main module).

`plan_shards`, `write_shard` and `write_index` are the pieces; `shard` runs them in one process
(and its pool), the Prefect flow maps `write_shard` over tasks.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
from pathlib import Path

from tqdm import tqdm

from resnet_pipeline.config import ShardConfig
from resnet_pipeline.data.records import write_shard_file
from resnet_pipeline.data.split import read_manifest
from resnet_pipeline.fileio import atomic_write_json, staged_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INDEX = "index.json"
ROW_KEYS = ("path", "label", "label_name", "sha256")


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def plan_shards(cfg: ShardConfig, manifest_path: str | Path) -> list[dict]:
    """The shards to write: `{"file", "split", "rows"}` each, rows in record order."""
    rows = [r for r in read_manifest(manifest_path).to_pylist() if r["status"] == "ok"]
    plans = []
    for split in SPLITS:
        records = sorted((r for r in rows if r["split"] == split), key=lambda r: (r["sha256"], r["path"]))
        size_mb = sum(r["bytes"] for r in records) / 2**20
        total = max(1, min(len(records), math.ceil(size_mb / cfg.target_shard_mb)))
        for i in range(total):
            chunk = records[len(records) * i // total : len(records) * (i + 1) // total]
            plans.append({
                "file": shard_name(split, i, total), "split": split,
                "rows": [{k: r[k] for k in ROW_KEYS} for r in chunk],
            })
    return plans


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def write_shard(plan: dict, raw_dir: str | Path, out_dir: str | Path, cfg: ShardConfig) -> dict:
    """Write one planned shard into `out_dir`; return its index entry (file, split, records, sha256)."""
    return write_shard_file(plan, raw_dir, out_dir, cfg.max_shorter_side, cfg.jpeg_quality)


def write_index(entries: list[dict], out_dir: str | Path) -> dict:
    index = {
        "splits": {
            split: {"records": sum(e["records"] for e in entries if e["split"] == split),
                    "shards": sum(e["split"] == split for e in entries)}
            for split in SPLITS
        },
        "shards": entries,
    }
    atomic_write_json(Path(out_dir) / INDEX, index)
    return index


def shard(cfg: ShardConfig, manifest_path: str | Path, raw_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the shards of every split; return the index (also written to `out_dir/index.json`)."""
    plans = plan_shards(cfg, manifest_path)
    workers = resolve_workers(cfg.workers)
    total = sum(len(p["rows"]) for p in plans)
    # spawn, not fork: the parent has TensorFlow's threads; the workers import Pillow only
    pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 else None)
    try:
        with staged_dir(out_dir) as tmp, tqdm(total=total, desc="shard", unit="img", disable=None) as bar:
            if pool is None:
                entries = []
                for plan in plans:
                    entries.append(write_shard(plan, raw_dir, tmp, cfg))
                    bar.update(len(plan["rows"]))
            else:
                # largest shards first, so that the workers finish together
                order = sorted(range(len(plans)), key=lambda i: -len(plans[i]["rows"]))
                futures = {pool.submit(write_shard_file, plans[i], raw_dir, tmp, cfg.max_shorter_side,
                                       cfg.jpeg_quality): i for i in order}
                done = {}
                for future in concurrent.futures.as_completed(futures):
                    done[futures[future]] = future.result()
                    bar.update(done[futures[future]]["records"])
                entries = [done[i] for i in range(len(plans))]
            index = write_index(entries, tmp)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    log.info("shard: %s in %d shards, %d worker(s)", {s: v["records"] for s, v in index["splits"].items()},
             len(entries), workers)
    return index
