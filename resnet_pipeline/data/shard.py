"""Shard stage: write each split of the manifest as TFRecord shards plus `shards/index.json`.

Records are `tf.train.Example`s with the Model Garden keys (README, "What each stage writes");
shards are named `SPLIT-NNNNN-of-MMMMM.tfrecord`. A split gets as many shards as its bytes need at
`target_shard_mb` each, and its records, ordered by content hash, are dealt out in equal runs, so
the same manifest gives the same shards. A pool of `workers` processes prepares the records
(checked against the manifest's sha256, converted to RGB, optionally shrunk, framed as TFRecords)
in pieces of consecutive records, which are appended to their shard file in order, so the shards
are byte-identical whatever the number of workers. The workers import Pillow, not TensorFlow.
The shards are written into a temporary folder that replaces the old one only when complete. If
`out_dir` is a symbolic link (`data/shards` on a bigger disk), that happens in the folder it points
to, and the link is kept (`fileio.staged_dir`).

With `workers` above 1, a script that calls `shard` must guard its entry point with
`if __name__ == "__main__":` (the workers are spawned, and import the main module).

`plan_shards`, `write_shard` and `write_index` are the pieces; `shard` runs them in one process
(and its pool), the Prefect flow maps `write_shard` over tasks.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import multiprocessing
import os
from functools import partial
from pathlib import Path

from tqdm import tqdm

from resnet_pipeline.config import ShardConfig
from resnet_pipeline.data.contracts import INDEX, SPLITS, check_manifest_rows, read_classes, read_manifest, shard_name
from resnet_pipeline.data.records import framed_records, write_shard_file
from resnet_pipeline.fileio import atomic_write_json, staged_dir

log = logging.getLogger(__name__)

CHUNK = 32  # records per piece of work handed to a worker
ROW_KEYS = ("path", "label", "label_name", "sha256")


def plan_shards(cfg: ShardConfig, manifest_path: str | Path, labels_path: str | Path | None = None) -> list[dict]:
    """The shards to write: `{"file", "split", "rows"}` each, rows in record order.

    Every manifest row is checked first against `labels_path` (default: labels.json beside the
    manifest): a relative path inside raw/, a label in range, a known split and status.
    """
    manifest_path = Path(manifest_path)
    classes = read_classes(labels_path or manifest_path.with_name("labels.json"))
    all_rows = read_manifest(manifest_path).to_pylist()
    check_manifest_rows(all_rows, manifest_path, classes)
    rows = [r for r in all_rows if r["status"] == "ok"]
    plans = []
    for split in SPLITS:
        records = sorted((r for r in rows if r["split"] == split), key=lambda r: (r["sha256"], r["path"]))
        size_mb = sum(r["bytes"] for r in records) / 2**20
        total = max(1, min(len(records), math.ceil(size_mb / cfg.target_shard_mb)))
        for i in range(total):
            chunk = records[len(records) * i // total : len(records) * (i + 1) // total]
            plans.append(
                {
                    "file": shard_name(split, i, total),
                    "split": split,
                    "rows": [{k: r[k] for k in ROW_KEYS} for r in chunk],
                }
            )
    return plans


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def write_shard(plan: dict, raw_dir: str | Path, out_dir: str | Path, cfg: ShardConfig) -> dict:
    """Write one planned shard into `out_dir`; return its index entry (file, split, records, sha256)."""
    return write_shard_file(plan, raw_dir, out_dir, cfg.max_shorter_side, cfg.jpeg_quality)


def write_index(entries: list[dict], out_dir: str | Path) -> dict:
    index = {
        "splits": {
            split: {
                "records": sum(e["records"] for e in entries if e["split"] == split),
                "shards": sum(e["split"] == split for e in entries),
            }
            for split in SPLITS
        },
        "shards": entries,
    }
    atomic_write_json(Path(out_dir) / INDEX, index)
    return index


def _write_in_order(folder: Path, plans: list[dict], pieces, bar) -> list[str]:
    """Append pieces `(shard number, record count, bytes)`, which come in shard order, to their
    files with one file open at a time (whatever the shard count); return each shard's sha256."""
    hashes = [hashlib.sha256() for _ in plans]
    current, f = -1, None
    try:
        for i, count, data in pieces:
            if i != current:
                if f:
                    f.close()
                for empty in range(current + 1, i):  # shards without records are empty files
                    open(folder / plans[empty]["file"], "wb").close()
                f = open(folder / plans[i]["file"], "wb")
                current = i
            assert f is not None
            f.write(data)
            hashes[i].update(data)
            bar.update(count)
    finally:
        if f:
            f.close()
    for empty in range(current + 1, len(plans)):
        open(folder / plans[empty]["file"], "wb").close()
    return [h.hexdigest() for h in hashes]


def shard(cfg: ShardConfig, manifest_path: str | Path, raw_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the shards of every split; return the index (also written to `out_dir/index.json`)."""
    plans = plan_shards(cfg, manifest_path)
    workers = resolve_workers(cfg.workers)
    total = sum(len(p["rows"]) for p in plans)
    # spawn, not fork: the parent has TensorFlow's threads; the workers import Pillow only
    pool = (
        concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )
    # pieces of CHUNK records, in shard order: the workers share every shard, and never wait at a
    # shard's end; the pieces come back in order and are appended to their shard file
    pieces = [
        (i, plan["rows"][k : k + CHUNK]) for i, plan in enumerate(plans) for k in range(0, len(plan["rows"]), CHUNK)
    ]
    # framed_records lives in the light records module: what the workers import
    prepare = partial(
        framed_records, raw_dir=raw_dir, max_shorter_side=cfg.max_shorter_side, jpeg_quality=cfg.jpeg_quality
    )
    rows_of = [rows for _, rows in pieces]
    try:
        with staged_dir(out_dir) as tmp, tqdm(total=total, desc="shard", unit="img", disable=None) as bar:
            results = pool.map(prepare, rows_of) if pool else map(prepare, rows_of)
            hashes = _write_in_order(
                tmp, plans, ((i, len(rows), data) for (i, rows), data in zip(pieces, results)), bar
            )
            entries = [
                {"file": plan["file"], "split": plan["split"], "records": len(plan["rows"]), "sha256": h}
                for plan, h in zip(plans, hashes)
            ]
            index = write_index(entries, tmp)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    log.info(
        "shard: %s in %d shards, %d worker(s)",
        {s: v["records"] for s, v in index["splits"].items()},
        len(entries),
        workers,
    )
    return index
