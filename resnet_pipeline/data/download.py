"""Download stage: bring a dataset into `data/raw/<dataset>/<class>/<image>` (one folder per class).

Sources (`download.dataset` in params):

- `digits`: the embedded default, scikit-learn's bundled copy of the UCI handwritten digits (1,797
  grayscale 8x8 images, 10 classes), written out as PNG files.
- `cifar10`: the official binary tarball (never the pickled Python one: unpickling a downloaded
  file runs code), md5-checked, one PNG per image.
- `voc2012`: the official trainval tar, md5-checked; one label per image, the class of its largest
  object (`voc_drop_multiclass` drops images whose objects span several classes).
- `imagefolder`: a local folder or `s3://bucket/prefix` with one sub-folder per class.
- `archive`: a `.tar`, `.tar.gz` or `.zip` at a URL, with its sha256, holding such a folder.

Archives are fetched into `data/downloads/` (resumable, retried, verified before use) and
extracted with every member checked first. The dataset folder is built beside its final place and
renamed into it, so an interrupted run leaves no half-written dataset; a complete one made from
the same download params is reused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from tqdm import tqdm

from resnet_pipeline.config import DownloadConfig
from resnet_pipeline.data.fetch import fetch, safe_extract
from resnet_pipeline.fileio import staged_dir
from resnet_pipeline.redact import redact_values

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_digits(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 gray levels -> 0..255, the full 8-bit range.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = dest / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"digit_{index:04d}.png").write_bytes(_png(image))
    return len(pixels)


def _fetch_archive(cfg: DownloadConfig, downloads: Path, url: str, md5: str | None) -> Path:
    name = Path(urlparse(url).path).name or "archive"
    downloads.mkdir(parents=True, exist_ok=True)
    return fetch(url, downloads / name, sha256=cfg.sha256, md5=md5, retries=cfg.retries)


def _count(dest: Path) -> int:
    return sum(1 for p in dest.rglob("*") if p.is_file() and p.name != COMPLETE)


def _write_cifar10(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    from resnet_pipeline.data import formats

    archive = _fetch_archive(cfg, downloads, cfg.url or formats.CIFAR10_URL, cfg.md5 or formats.CIFAR10_MD5)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract.") as extracted:
        safe_extract(archive, extracted)
        return formats.cifar10_binary_to_folder(Path(extracted), dest)


def _voc_member(name: str) -> bool:
    parts = name.split("/")
    return any(p in ("JPEGImages", "Annotations") for p in parts) or "/".join(parts[-3:-1]) == "ImageSets/Main"


def _write_voc2012(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    from resnet_pipeline.data import formats

    archive = _fetch_archive(cfg, downloads, cfg.url or formats.VOC2012_URL, cfg.md5 or formats.VOC2012_MD5)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract.") as extracted:
        safe_extract(archive, extracted, select=_voc_member)
        summary = formats.voc_to_folder(Path(extracted), dest, drop_multiclass=cfg.voc_drop_multiclass)
    log.info("download: voc2012 %s", summary)
    return summary["images"]


def _image_folder_root(folder: Path) -> Path:
    """Descend through folders that hold a single folder and nothing else (an archive's top folder)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
        else:
            return folder


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _move_tree(src: Path, dest: Path) -> None:
    for entry in src.iterdir():
        shutil.move(str(entry), str(dest / entry.name))


def _write_archive(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    archive = _fetch_archive(cfg, downloads, cfg.url, cfg.md5)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract.") as extracted:
        safe_extract(archive, extracted)
        _move_tree(_image_folder_root(Path(extracted)), dest)
    return _count(dest)


def _write_imagefolder(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    if cfg.path.startswith("s3://"):
        return _download_s3_folder(cfg.path, dest, cfg.s3_endpoint_url)
    source = Path(cfg.path).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"download.path: {source} is not a folder; expected one sub-folder per class")
    for file in sorted(source.rglob("*")):
        if file.is_file():
            _link_or_copy(file, dest / file.relative_to(source))
    return _count(dest)


def _download_s3_folder(url: str, dest: Path, endpoint_url: str | None) -> int:
    """Every object under s3://bucket/prefix/ into dest, keeping the key below the prefix."""
    import boto3

    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise ValueError(f"download.path: received {url!r}; expected s3://bucket/prefix")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = boto3.client("s3", endpoint_url=endpoint_url or None)
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    if not keys:
        raise FileNotFoundError(f"download.path: no objects under {url}; expected one sub-folder per class")
    for key in tqdm(keys, desc="download s3", unit="file", disable=None):
        relative = Path(key[len(prefix):])
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"download.path: object key {key!r} under {url} escapes the folder")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return len(keys)


WRITERS = {
    "digits": _write_digits,
    "cifar10": _write_cifar10,
    "voc2012": _write_voc2012,
    "imagefolder": _write_imagefolder,
    "archive": _write_archive,
}


def _source_id(cfg: DownloadConfig) -> dict:
    """What identifies the dataset's source, URLs redacted: a presigned URL's signature changes with
    every signing, while the archive it names is pinned by its checksum."""
    return redact_values({k: v for k, v in asdict(cfg).items() if k != "retries"})


def download(cfg: DownloadConfig, raw_dir: str | Path, downloads_dir: str | Path | None = None) -> Path:
    """Materialise `cfg.dataset` under `raw_dir/<dataset>`; return that folder.

    `downloads_dir` (default: `raw_dir/../downloads`) keeps fetched archives, partial ones included,
    so that a cut download resumes.
    """
    raw_dir = Path(raw_dir)
    downloads = Path(downloads_dir) if downloads_dir else raw_dir.parent / "downloads"
    dest = raw_dir / cfg.dataset
    marker = dest / COMPLETE
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = None
        if isinstance(done, dict) and done.get("source") == _source_id(cfg):
            log.info("download: %s already complete at %s", cfg.dataset, dest)
            return dest
    with staged_dir(dest) as tmp:
        count = WRITERS[cfg.dataset](cfg, tmp, downloads)
        marker_data = {"source": _source_id(cfg), "files": count}
        (tmp / COMPLETE).write_text(json.dumps(marker_data, sort_keys=True) + "\n")
    log.info("download: wrote %d files of %s to %s", count, cfg.dataset, dest)
    return dest
