"""Split stage: scan an image folder, check every image once, assign train/val/test.

Writes `manifest.parquet` (one row per image, columns of design.md) and `labels.json` (class
order). The split of an image is decided by a hash of its *content* and the seed, so exact
duplicates always share a split and adding images never moves existing ones. Each class is drawn
on its own, so the ratios hold per class (stratified), up to the sampling noise of the hash.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from resnet_pipeline.config import SplitConfig
from resnet_pipeline.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("bytes", pa.int64()),
        ("status", pa.string()),
    ]
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def assign_split(sha256: str, seed: int, cfg: SplitConfig) -> str:
    """train/val/test for an image, from a uniform draw keyed by its content hash and the seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.train:
        return "train"
    return "val" if u < cfg.train + cfg.val else "test"


def _inspect(data: bytes) -> tuple[int, int, str]:
    """(width, height, status) of an encoded image; status is "ok" or why it is excluded."""
    if not data:
        return 0, 0, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.width, img.height, "ok"
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return 0, 0, f"undecodable: {err}"


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Class names (sorted) and (file, class name) pairs of a one-folder-per-class tree."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found; run the download stage first")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{folder}: found {len(classes)} class folder(s) {classes}; expected at least 2")
    files = [
        (f, c)
        for c in classes
        for f in sorted((folder / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    ]
    return classes, files


def split(cfg: SplitConfig, seed: int, image_folder: str | Path, manifest_path: str | Path, labels_path: str | Path) -> pa.Table:
    """Build the manifest of `image_folder` and write it with labels.json; return the table."""
    image_folder = Path(image_folder)
    classes, files = scan_image_folder(image_folder)
    rows = {name: [] for name in SCHEMA.names}
    for file, class_name in files:
        data = file.read_bytes()
        digest = sha256_bytes(data)
        width, height, status = _inspect(data)
        values = {
            "path": file.relative_to(image_folder.parent).as_posix(),
            "label": classes.index(class_name),
            "label_name": class_name,
            "split": assign_split(digest, seed, cfg),
            "sha256": digest,
            "width": width,
            "height": height,
            "bytes": len(data),
            "status": status,
        }
        for k, v in values.items():
            rows[k].append(v)
    table = pa.table(rows, schema=SCHEMA)
    empty = [c for i, c in enumerate(classes) if not any(l == i and s == "ok" for l, s in zip(rows["label"], rows["status"]))]
    if empty:
        raise ValueError(f"{image_folder}: class folder(s) {empty} hold no usable image")

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(manifest_path, sink.getvalue().to_pybytes())
    atomic_write_json(labels_path, {"classes": classes})
    counts = {s: rows["split"].count(s) for s in ("train", "val", "test")}
    excluded = sum(s != "ok" for s in rows["status"])
    log.info("split: %d images, %d classes, %s, %d excluded", len(files), len(classes), counts, excluded)
    return table


def read_manifest(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found; run the split stage first")
    table = pq.read_table(path)
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; expected {SCHEMA.names}")
    return table
