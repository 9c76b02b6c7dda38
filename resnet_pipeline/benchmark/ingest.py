"""Scale of the data stages: download (imagefolder), split and shard at growing sizes, and the S3
image-folder download with parallel requests against one request at a time.

    resnet-pipeline benchmark ingest [--sizes 10000,40000,160000] [--classes 100] [--s3-objects 2000]
                                     [--s3-workers 16] [--no-s3] [--s3-endpoint URL] [--output FILE]

A folder of small JPEGs (64x48, `--classes` classes) is generated for the largest size and the
smaller sizes take a subset of it. Each stage runs in a fresh process, so that its peak RSS is its
own (`ru_maxrss`; the shard workers' peak is reported beside it). The per-image cost at the largest
size is compared with the smallest. The S3 part uploads `--s3-objects` JPEGs to a new bucket on
`--s3-endpoint` (else the checkout's development SeaweedFS on loopback: `benchmark/s3.py`) and
times the download stage's S3 folder download with 1 and with `--s3-workers` requests at a time,
and the sequential `download_file` loop it replaced, in alternating rounds.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import multiprocessing
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

from resnet_pipeline.benchmark.harness import work_folder
from resnet_pipeline.config import DownloadConfig

log = logging.getLogger(__name__)

SIZE = (64, 48)


def make_folder(folder: Path, n_images: int, classes: int, seed: int = 0) -> Path:
    """`n_images` distinct random 64x48 JPEGs in `classes` folders `c000`, ... (image i in class i % classes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    base = np.linspace(0, 200, SIZE[0] * SIZE[1] * 3).reshape(SIZE[1], SIZE[0], 3)
    for i in range(n_images):
        pixels = (base + rng.integers(0, 56, base.shape)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % classes:03d}" / f"img_{i:06d}.jpg", format="JPEG", quality=85)
    return folder


def subset(source: Path, dest: Path, n_images: int) -> Path:
    """Hard links to the first `n_images` images (by index) of a `make_folder` folder."""
    for file in source.glob("*/*.jpg"):
        if int(file.stem.split("_")[1]) < n_images:
            (dest / file.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(file, dest / file.parent.name / file.name)
    return dest


def _stage(name: str, work: str, source: str) -> dict:
    """Run one stage in this (fresh) process; return its seconds and peak RSS figures."""
    from resnet_pipeline.config import DownloadConfig, ShardConfig, SplitConfig
    from resnet_pipeline.data.download import download
    from resnet_pipeline.data.shard import shard
    from resnet_pipeline.data.split import split

    work_dir = Path(work)
    start = time.perf_counter()
    if name == "download":
        download(DownloadConfig(dataset="imagefolder", path=source), work_dir / "raw")
    elif name == "split":
        split(
            SplitConfig(), 42, work_dir / "raw" / "imagefolder", work_dir / "manifest.parquet", work_dir / "labels.json"
        )
    else:
        shard(ShardConfig(), work_dir / "manifest.parquet", work_dir / "raw", work_dir / "shards")
    seconds = time.perf_counter() - start
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {
        "seconds": seconds,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb / 2**20,
        "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb / 2**20,
    }


def _in_child(name: str, work: Path, source: Path) -> dict:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_stage, name, str(work), str(source)).result()


def run_stages(sizes: list[int], classes: int, work: Path) -> list[dict]:
    """Figures of download, split and shard at every size (one row per stage and size)."""
    source = make_folder(work / "source", max(sizes), classes)
    rows = []
    for n in sizes:
        here = work / f"n{n}"
        src = source if n == max(sizes) else subset(source, here / "source", n)
        for name in ("download", "split", "shard"):
            figures = _in_child(name, here, src)
            rows.append({"stage": name, "images": n, **figures, "us_per_image": figures["seconds"] / n * 1e6})
            log.info("benchmark ingest: %s of %d images: %.2f s", name, n, figures["seconds"])
        shutil.rmtree(here, ignore_errors=True)
    return rows


def growth(rows: list[dict]) -> dict[str, float]:
    """Per-image cost at the largest size / at the smallest, per stage."""
    out = {}
    for name in ("download", "split", "shard"):
        mine = sorted((r for r in rows if r["stage"] == name), key=lambda r: r["images"])
        out[name] = mine[-1]["us_per_image"] / mine[0]["us_per_image"]
    return out


def _listed_targets(client, bucket: str, prefix: str, dest: Path) -> list[tuple[str, Path]]:
    """Every key under `prefix` and its file under `dest` (its folder made)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    pairs = [(o["Key"], dest / o["Key"][len(prefix) :]) for page in pages for o in page.get("Contents", [])]
    for _, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
    return pairs


def _sequential_download_file(client, bucket: str, prefix: str, dest: Path) -> None:
    """The download stage's S3 loop before it went parallel: list, then download_file one by one."""
    for key, target in _listed_targets(client, bucket, prefix, dest):
        client.download_file(bucket, key, str(target))


def _sequential_get_object(client, bucket: str, prefix: str, dest: Path) -> None:
    """One boto3 get_object at a time, written to its file: the stage's download with 1 worker
    before it fetched through presigned URLs."""
    for key, target in _listed_targets(client, bucket, prefix, dest):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with open(target, "xb") as f:
            for block in body.iter_chunks(1 << 20):
                f.write(block)


# The S3 folder download (`parallel`: the stage with --s3-workers requests; `stage one at a time`:
# the stage with 1) and the two sequential references it is compared with.
S3_KINDS = ("parallel", "get_object loop", "download_file loop", "stage one at a time")


def run_s3(
    n_objects: int, workers: int, work: Path, server=None, rounds: int = 2, endpoint_url: str | None = None
) -> dict:
    """Seconds (medians of `rounds`) of the stage's S3 folder download with `workers` requests and
    with 1, and of the two sequential references: a get_object loop and the old download_file loop."""
    from resnet_pipeline.data.download import _download_s3_folder

    own = server is None
    if own:
        from resnet_pipeline.benchmark.s3 import s3_server

        server = s3_server(endpoint_url, work / "seaweed")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_DEFAULT_REGION="us-east-1"
    )
    try:
        bucket = server.make_bucket(f"bench-ingest-{os.getpid()}-{time.monotonic_ns() % 10**6}")
        client = server.client()
        files = sorted(make_folder(work / "s3-source", n_objects, 10, seed=1).glob("*/*.jpg"))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # within the client's 10 connections
            list(
                pool.map(
                    lambda f: client.put_object(
                        Bucket=bucket, Key=f"set/{f.parent.name}/{f.name}", Body=f.read_bytes()
                    ),
                    files,
                )
            )
        url = f"s3://{bucket}/set"
        runs: dict[str, list[float]] = {kind: [] for kind in S3_KINDS}
        load_start = os.getloadavg()
        for r in range(rounds):
            for kind in S3_KINDS if r % 2 == 0 else reversed(S3_KINDS):
                dest = work / f"s3-{r}-{S3_KINDS.index(kind)}"
                dest.mkdir(parents=True)
                start = time.perf_counter()
                if kind == "download_file loop":
                    _sequential_download_file(client, bucket, "set/", dest)
                elif kind == "get_object loop":
                    _sequential_get_object(client, bucket, "set/", dest)
                else:
                    count = _download_s3_folder(url, dest, server.endpoint_url, workers if kind == "parallel" else 1)
                    assert count == n_objects, (count, n_objects)
                runs[kind].append(time.perf_counter() - start)
                shutil.rmtree(dest, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        return {
            "objects": n_objects,
            "workers": workers,
            "seconds": med,
            "speedup_vs_get_object_loop": med["get_object loop"] / med["parallel"],
            "speedup_vs_download_file_loop": med["download_file loop"] / med["parallel"],
            "rounds": {k: [round(t, 3) for t in v] for k, v in runs.items()},
            "load_average": {"start": load_start, "end": os.getloadavg()},  # 1, 5, 15 min
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if own:
            server.stop()


def run(
    sizes: list[int],
    *,
    classes: int = 100,
    s3_objects: int = 2000,
    s3_workers: int = DownloadConfig.s3_workers,
    work_dir: Path | None = None,
    s3_server=None,
    s3_endpoint: str | None = None,
) -> dict:
    """Every figure of the benchmark (see the module doc); `s3_objects=0` skips the S3 part."""
    with work_folder(work_dir, "bench-ingest-") as work:
        rows = run_stages(sorted(sizes), classes, work)
        s3 = run_s3(s3_objects, s3_workers, work, s3_server, endpoint_url=s3_endpoint) if s3_objects else None
        return {"sizes": sorted(sizes), "classes": classes, "stages": rows, "growth": growth(rows), "s3": s3}


def format_result(r: dict) -> str:
    out = io.StringIO()
    out.write(
        f"{'stage':<9} {'images':>8} {'seconds':>9} {'images/s':>9} {'us/image':>9} "
        f"{'peak RSS MB':>12} {'workers MB':>11}\n"
    )
    for row in r["stages"]:
        out.write(
            f"{row['stage']:<9} {row['images']:>8} {row['seconds']:>9.2f} {row['images'] / row['seconds']:>9.0f} "
            f"{row['us_per_image']:>9.1f} {row['rss_mb']:>12.0f} {row['workers_rss_mb']:>11.0f}\n"
        )
    small, large = r["sizes"][0], r["sizes"][-1]
    for name, g in r["growth"].items():
        out.write(f"per-image cost {name} at {large} / at {small}: {g:.2f}x\n")
    if r["s3"]:
        s = r["s3"]
        sec = s["seconds"]
        load = " ".join(f"{x:.2f}" for x in s["load_average"]["start"])
        out.write(
            f"S3 folder of {s['objects']} objects (load average at start {load}): "
            f"{s['workers']} requests at a time {sec['parallel']:.2f} s; "
            f"get_object one at a time {sec['get_object loop']:.2f} s ({s['speedup_vs_get_object_loop']:.2f}x); "
            f"old download_file loop {sec['download_file loop']:.2f} s ({s['speedup_vs_download_file_loop']:.2f}x); "
            f"the stage with 1 request at a time {sec['stage one at a time']:.2f} s\n"
            f"  rounds: {s['rounds']}\n"
        )
    return out.getvalue().rstrip("\n")
