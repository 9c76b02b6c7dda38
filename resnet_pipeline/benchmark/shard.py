"""Sharding time with 1 and with N worker processes on the same manifest, and the shards' identity.

    resnet-pipeline benchmark shard [--images DIR] [--count 2000] [--workers 2] [--max-shorter-side 256] [--repeats 3]

Without `--images`, a folder of `--count` JPEGs of 500x375 in 10 classes is generated first. The
folder is split once, then sharded with 1 worker and with `--workers`, each into its own folder;
the figures are the wall times, the speed-up and whether every shard file is byte-identical.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from resnet_pipeline.benchmark.harness import work_folder
from resnet_pipeline.config import ShardConfig, SplitConfig
from resnet_pipeline.data.shard import shard
from resnet_pipeline.data.split import split

log = logging.getLogger(__name__)


def run(
    images: Path | None,
    work_dir: Path | None = None,
    *,
    count: int = 2000,
    workers: int = 2,
    max_shorter_side: int = 256,
    repeats: int = 3,
) -> dict:
    """Time the shard stage with 1 and `workers` processes, in `repeats` alternating rounds (so that a
    slow spell of a shared machine falls on both); the figures are the medians."""
    from resnet_pipeline.benchmark.input import make_jpeg_folder

    with work_folder(work_dir, "bench-shard-") as work:
        if images is None:
            images = make_jpeg_folder(work / "raw" / "images", n_images=count)
        raw = Path(images).parent
        manifest = work / "manifest.parquet"
        table = split(SplitConfig(), 42, images, manifest, work / "labels.json")
        runs: dict[int, list[float]] = {1: [], workers: []}
        for r in range(repeats):
            for n in (1, workers):
                cfg = ShardConfig(workers=n, max_shorter_side=max_shorter_side, target_shard_mb=8)
                start = time.perf_counter()
                shard(cfg, manifest, raw, work / f"shards-{n}")
                runs[n].append(time.perf_counter() - start)
                log.info("benchmark shard: round %d, %d worker(s): %.2f s", r + 1, n, runs[n][-1])
        timings = {n: statistics.median(t) for n, t in runs.items()}
        one, many = work / "shards-1", work / f"shards-{workers}"
        names = sorted(p.name for p in one.iterdir())
        identical = names == sorted(p.name for p in many.iterdir()) and all(
            (one / name).read_bytes() == (many / name).read_bytes() for name in names
        )
        return {
            "images": table.num_rows,
            "workers": workers,
            "max_shorter_side": max_shorter_side,
            "seconds_1_worker": timings[1],
            f"seconds_{workers}_workers": timings[workers],
            "speedup": timings[1] / timings[workers],
            "byte_identical": identical,
            "files": len(names),
            "rounds": {str(n): [round(t, 3) for t in ts] for n, ts in runs.items()},
        }


def format_result(r: dict) -> str:
    w = r["workers"]
    return "\n".join(
        [
            f"images: {r['images']}  shorter side capped at {r['max_shorter_side'] or 'no cap'}  files: {r['files']}",
            f"1 worker:   {r['seconds_1_worker']:.2f} s  ({r['images'] / r['seconds_1_worker']:.0f} images/s)",
            f"{w} workers:  {r[f'seconds_{w}_workers']:.2f} s  "
            f"({r['images'] / r[f'seconds_{w}_workers']:.0f} images/s)",
            f"speed-up:   {r['speedup']:.2f}x  (medians of {len(r['rounds']['1'])} alternating rounds: {r['rounds']})",
            f"shards byte-identical: {'yes' if r['byte_identical'] else 'NO'}",
        ]
    )
