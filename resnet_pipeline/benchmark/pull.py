"""`registry pull` throughput against a plain HTTP GET of the same objects from the same server.

    resnet-pipeline benchmark pull --seaweed [--size-mb 100] [--rounds 3]
    resnet-pipeline benchmark pull --registry s3://bucket/prefix     # credentials, AWS_ENDPOINT_URL from the env

A version with a `--size-mb` model.keras of random bytes (and three small files) is registered
under a unique name; then, in alternating rounds (so that a slow spell of a shared machine falls on
both), the whole version is pulled with `registry pull` (managed transfer, every sha256 verified)
and fetched by plain GETs of presigned URLs streamed to disk (no verification). The figures are
the medians in MB/s (10^6 bytes) and their ratio. The benchmark's objects are deleted at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def _random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK * 8, left)
            f.write(os.urandom(n))
            left -= n
    return path


def _plain_get(urls: dict[str, str], folder: Path) -> int:
    """GET every URL and stream it to a file in `folder`; return the bytes written."""
    total = 0
    for target, url in urls.items():
        path = folder / target
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=120) as response, open(path, "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                total += len(chunk)
    return total


def run(registry: str | None, *, seaweed: bool = False, size_mb: float = 100.0, rounds: int = 3) -> dict:
    """Register a version of `size_mb`, then time pulls and plain GETs in `rounds` alternating rounds."""
    from resnet_pipeline.registry import open_registry
    from resnet_pipeline.registry.s3 import S3Storage

    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    server = None
    try:
        if seaweed:
            from resnet_pipeline.devs3 import SeaweedS3

            server = SeaweedS3(work / "seaweed").start()
            server.make_bucket("bench-pull")
            reg = open_registry("s3://bench-pull/registry", endpoint_url=server.endpoint_url, region=server.region,
                                access_key=server.access_key, secret_key=server.secret_key)
        else:
            reg = open_registry(registry)
        if not isinstance(reg.storage, S3Storage):
            raise ValueError(f"benchmark pull: {registry!r} is not an s3:// registry; presigned GETs need S3")
        src = work / "src"
        src.mkdir()
        files = {"model.keras": _random_file(src / "model.keras", int(size_mb * 1e6))}
        for name, text in (("params.yaml", "train:\n  epochs: 1\n"), ("labels.json", '{"classes": ["a", "b"]}\n'),
                           ("metrics.json", '{"test": {"top1": 0.5}}\n')):
            (src / name).write_text(text)
            files[name] = src / name
        name = f"bench-pull-{uuid.uuid4().hex[:8]}"
        version = reg.register(name, files, {"benchmark": True})
        manifest = reg.manifest(f"{name}:{version}")
        total = sum(e["bytes"] for e in manifest["files"].values())
        urls = {t: reg.storage.presigned_url(reg._version_key(name, version, t)) for t in manifest["files"]}
        times: dict[str, list[float]] = {"pull": [], "get": []}
        for r in range(rounds):
            order = ("pull", "get") if r % 2 == 0 else ("get", "pull")
            for what in order:
                dest = work / f"{what}-{r}"
                start = time.perf_counter()
                if what == "pull":
                    reg.pull(f"{name}:{version}", dest)
                else:
                    dest.mkdir()
                    _plain_get(urls, dest)
                times[what].append(time.perf_counter() - start)
                shutil.rmtree(dest)
        reg.storage.delete([o.key for o in reg.storage.list(f"models/{name}/")])
        pull_s, get_s = statistics.median(times["pull"]), statistics.median(times["get"])
        return {"registry": reg.location, "endpoint": reg.storage.endpoint, "bytes": total, "rounds": rounds,
                "pull_seconds": [round(t, 4) for t in times["pull"]], "get_seconds": [round(t, 4) for t in times["get"]],
                "pull_mb_s": round(total / 1e6 / pull_s, 1), "get_mb_s": round(total / 1e6 / get_s, 1),
                "ratio": round(get_s / pull_s, 3)}
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(work, ignore_errors=True)


def format_result(result: dict) -> str:
    mb = result["bytes"] / 1e6
    return "\n".join([
        f"registry {result['registry']} at {result['endpoint']}: {mb:.1f} MB per pull, {result['rounds']} rounds (medians)",
        f"  registry pull (managed transfer, sha256 verified)  {result['pull_mb_s']:8.1f} MB/s",
        f"  plain GET of presigned URLs, streamed to disk       {result['get_mb_s']:8.1f} MB/s",
        f"  ratio pull / GET                                    {result['ratio']:8.3f}",
    ])


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(None, seaweed=True, size_mb=20, rounds=1), indent=2))
