"""`registry pull` throughput against a plain HTTP GET of the same objects from the same server.

    resnet-pipeline benchmark pull [--seaweed] [--pin] [--size-mb 100] [--rounds 3] [--part-mb 64] [--connections 4]
    resnet-pipeline benchmark pull --s3-endpoint URL       # a new bucket there; credentials from the AWS env/profile
    resnet-pipeline benchmark pull --registry s3://bucket/prefix [--s3-endpoint URL]   # else AWS_ENDPOINT_URL

A version with a `--size-mb` model.keras of random bytes (and three small files) is registered
under a unique name; then, in alternating rounds (so that a slow spell of a shared machine falls on
both), the whole version is pulled with `registry pull` (managed transfer, every sha256 verified)
and fetched by plain GETs of presigned URLs streamed to disk (no verification). The figures are
the medians in MB/s (10^6 bytes) and their ratio, with the CPU seconds this process spent on each
(and the server's, for the development server). The benchmark's objects (and the bucket it made)
are deleted at the end.

Without `--registry` or `--s3-endpoint` (or with `--seaweed`) the benchmark starts the development
SeaweedFS of the source checkout on loopback (`benchmark/s3.py`). It shares this machine's cores
with the client, and a pull has to hash every byte (sha256, about 1.8 GB/s on one core here) on
top of receiving it. `--pin` puts the server on the first CPU and this process on the others, as a
remote S3 would not take the client's cores; without it, the two compete and the ratio measures
the machine's CPU budget as much as the client.
"""

from __future__ import annotations

import json
import logging
import os
import resource
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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pid(server) -> int:
    """The process id of a started SeaweedS3."""
    if server.process is None:
        raise RuntimeError("benchmark pull: the SeaweedFS server is not running")
    return server.process.pid


def run(
    registry: str | None,
    *,
    s3_endpoint: str | None = None,
    size_mb: float = 100.0,
    rounds: int = 3,
    pin: bool = False,
    part_mb: float | None = None,
    connections: int | None = None,
) -> dict:
    """Register a version of `size_mb`, then time pulls and plain GETs in `rounds` alternating rounds:
    in `registry`, else in a new bucket on `s3_endpoint`, else on the development server."""
    from resnet_pipeline.benchmark.s3 import s3_server
    from resnet_pipeline.registry import open_registry
    from resnet_pipeline.registry.s3 import S3Storage

    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    server = None
    cpus = sorted(os.sched_getaffinity(0))
    local = not registry and not s3_endpoint
    if pin and (not local or len(cpus) < 2):
        raise ValueError(
            f"benchmark pull --pin needs the development server and 2 CPUs or more; this process may use {len(cpus)}"
        )
    try:
        if registry:
            reg = open_registry(registry, endpoint_url=s3_endpoint)
        else:
            if pin:  # the server inherits the first CPU; this process then takes the others
                os.sched_setaffinity(0, cpus[:1])
            server = s3_server(s3_endpoint, work / "seaweed")
            if pin:
                os.sched_setaffinity(0, cpus[1:])
            bucket = server.make_bucket(f"bench-pull-{uuid.uuid4().hex[:8]}")
            reg = open_registry(
                f"s3://{bucket}/registry",
                endpoint_url=server.endpoint_url,
                region=server.region,
                access_key=server.access_key,
                secret_key=server.secret_key,
            )
        if not isinstance(reg.storage, S3Storage):
            raise ValueError(f"benchmark pull: {registry!r} is not an s3:// registry; presigned GETs need S3")
        if part_mb:
            reg.storage.download_part_size = int(part_mb * 1024 * 1024)
        if connections:
            reg.storage.download_concurrency = connections
        src = work / "src"
        src.mkdir()
        files: dict[str, str | Path] = {"model.keras": _random_file(src / "model.keras", int(size_mb * 1e6))}
        for name, text in (
            ("params.yaml", "train:\n  epochs: 1\n"),
            ("labels.json", '{"classes": ["a", "b"]}\n'),
            ("metrics.json", '{"test": {"top1": 0.5}}\n'),
        ):
            (src / name).write_text(text)
            files[name] = src / name
        name = f"bench-pull-{uuid.uuid4().hex[:8]}"
        version = reg.register(name, files, {"benchmark": True})
        manifest = reg.manifest(f"{name}:{version}")
        total = sum(e["bytes"] for e in manifest["files"].values())
        urls = {t: reg.storage.presigned_url(reg._version_key(name, version, t)) for t in manifest["files"]}
        times: dict[str, list[float]] = {"pull": [], "get": []}
        cpu: dict[str, list[float]] = {"pull": [], "get": [], "server_pull": [], "server_get": []}
        for r in range(rounds):
            order = ("pull", "get") if r % 2 == 0 else ("get", "pull")
            for what in order:
                dest = work / f"{what}-{r}"
                server_cpu = _process_cpu_seconds(_pid(server)) if local else 0.0
                start_cpu, start = _cpu_seconds(), time.perf_counter()
                if what == "pull":
                    reg.pull(f"{name}:{version}", dest)
                else:
                    dest.mkdir()
                    _plain_get(urls, dest)
                times[what].append(time.perf_counter() - start)
                cpu[what].append(_cpu_seconds() - start_cpu)
                if local:
                    cpu[f"server_{what}"].append(_process_cpu_seconds(_pid(server)) - server_cpu)
                shutil.rmtree(dest)
        reg.storage.delete([o.key for o in reg.storage.list(f"models/{name}/")])
        pull_s, get_s = statistics.median(times["pull"]), statistics.median(times["get"])
        return {
            "registry": reg.location,
            "endpoint": reg.storage.endpoint,
            "bytes": total,
            "rounds": rounds,
            "pinned": pin,
            "part_bytes": reg.storage.download_part_size,
            "connections": reg.storage.download_concurrency,
            "cpu_seconds": {k: round(statistics.median(v), 4) for k, v in cpu.items() if v},
            "pull_seconds": [round(t, 4) for t in times["pull"]],
            "get_seconds": [round(t, 4) for t in times["get"]],
            "pull_mb_s": round(total / 1e6 / pull_s, 1),
            "get_mb_s": round(total / 1e6 / get_s, 1),
            "ratio": round(get_s / pull_s, 3),
        }
    finally:
        if server is not None:
            server.close()
        if pin:
            os.sched_setaffinity(0, cpus)
        shutil.rmtree(work, ignore_errors=True)


def format_result(result: dict) -> str:
    mb = result["bytes"] / 1e6
    cpu = result["cpu_seconds"]

    def cpu_text(what: str) -> str:
        server = f", server {cpu[f'server_{what}']:.3f}" if f"server_{what}" in cpu else ""
        return f"CPU s: this process {cpu[what]:.3f}{server}"

    pinned = "server on CPU 0, client on the others" if result["pinned"] else "not pinned"
    return "\n".join(
        [
            f"registry {result['registry']} at {result['endpoint']}: {mb:.1f} MB per pull, {result['rounds']} rounds "
            f"(medians), {pinned}",
            f"  registry pull ({result['part_bytes'] / 2**20:g} MB parts, {result['connections']} connections, "
            f"sha256 verified)  {result['pull_mb_s']:8.1f} MB/s   {cpu_text('pull')}",
            f"  plain GET of presigned URLs, streamed to disk             {result['get_mb_s']:8.1f} MB/s   "
            f"{cpu_text('get')}",
            f"  ratio pull / GET                                          {result['ratio']:8.3f}",
        ]
    )


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(None, size_mb=20, rounds=1), indent=2))
