"""Split stage: scan an image folder, check every image once, assign train/val/test.

Writes `manifest.parquet` (one row per image, the columns of the README's "What each stage
writes") and `labels.json` (class order). The split of an image is decided by a hash of its
*content* and the seed, so exact duplicates always share a split and adding images never moves
existing ones. Each class is drawn on its own, so the ratios hold per class (stratified), up to
the sampling noise of the hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from resnet_pipeline.config import SplitConfig
from resnet_pipeline.data.contracts import SCHEMA, read_manifest  # noqa: F401 - read_manifest: also this module's API
from resnet_pipeline.data.images import Inspection, inspect
from resnet_pipeline.fileio import atomic_write_bytes, atomic_write_json, read_regular, sha256_bytes

log = logging.getLogger(__name__)


def assign_split(sha256: str, seed: int, cfg: SplitConfig) -> str:
    """train/val/test for an image, from a uniform draw keyed by its content hash and the seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.train:
        return "train"
    return "val" if u < cfg.train + cfg.val else "test"


def _walk_class(folder: Path, class_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """(file, problem) of every non-hidden entry below a class folder; links are listed, never followed."""
    for here, dirs, names in os.walk(class_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(dirs):
            if os.path.islink(os.path.join(here, name)):
                yield Path(here, name), "symbolic link: not followed (links may point out of the dataset)"
        for name in sorted(names):
            if name.startswith("."):
                continue
            mode = os.lstat(os.path.join(here, name)).st_mode
            problem = (
                None
                if stat.S_ISREG(mode)
                else "symbolic link: not followed (links may point out of the dataset)"
                if stat.S_ISLNK(mode)
                else "not a regular file: a device, FIFO or socket"
            )
            yield Path(here, name), problem


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, str, str | None]]]:
    """Class names (sorted) and (file, class name, problem) triples of a one-folder-per-class tree.

    Every entry that is not hidden is listed, whatever its name: the check of its content decides.
    Links are listed with their problem and never read. A class folder that is a link, or that
    holds no entry, is an error naming it.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found; run the download stage first")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    linked = [p.name for p in entries if p.is_symlink()]
    if linked:
        raise ValueError(
            f"{folder}: class folder(s) {linked} are symbolic links, which are not followed "
            "(links may point out of the dataset); copy the images in instead"
        )
    classes = [p.name for p in entries if p.is_dir()]
    if len(classes) < 2:
        raise ValueError(f"{folder}: found {len(classes)} class folder(s) {classes}; expected at least 2")
    files = [(f, c, problem) for c in classes for f, problem in _walk_class(folder, folder / c)]
    found = {c for _, c, _ in files}
    empty = [c for c in classes if c not in found]
    if empty:
        raise ValueError(
            f"{folder}: class folder(s) {empty} hold no files; every class folder becomes a class, "
            "so remove the empty ones or add images"
        )
    return classes, files


def _conflicting_duplicates(rows: dict[str, list]) -> dict[str, set[str]]:
    """sha256 -> class names, for identical images filed under several classes."""
    labels: dict[str, set[str]] = defaultdict(set)
    for digest, name, status in zip(rows["sha256"], rows["label_name"], rows["status"]):
        if status == "ok":
            labels[digest].add(name)
    return {d: names for d, names in labels.items() if len(names) > 1}


def split(
    cfg: SplitConfig, seed: int, image_folder: str | Path, manifest_path: str | Path, labels_path: str | Path
) -> pa.Table:
    """Build the manifest of `image_folder` and write it with labels.json; return the table.

    Every file is opened once (`images.inspect`); unusable ones stay in the manifest with the reason
    in `status`, and a summary is logged. A class left without a usable image is an error.
    """
    image_folder = Path(image_folder)
    classes, files = scan_image_folder(image_folder)
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    label_of = {name: i for i, name in enumerate(classes)}
    for file, class_name, problem in tqdm(files, desc="split", unit="img", disable=None):
        data = b"" if problem else read_regular(file)
        found = Inspection(0, 0, "", "", problem) if problem else inspect(data, cfg.min_side)
        digest = sha256_bytes(data)
        values = {
            "path": file.relative_to(image_folder.parent).as_posix(),
            "label": label_of[class_name],
            "label_name": class_name,
            "split": assign_split(digest, seed, cfg),
            "sha256": digest,
            "width": found.width,
            "height": found.height,
            "bytes": len(data),
            "status": found.status,
        }
        for k, v in values.items():
            rows[k].append(v)
    table = pa.table(rows, schema=SCHEMA)
    ok_labels = {label for label, status in zip(rows["label"], rows["status"]) if status == "ok"}
    empty = [c for i, c in enumerate(classes) if i not in ok_labels]
    if empty:
        raise ValueError(
            f"{image_folder}: class folder(s) {empty} hold no usable image; "
            "every class needs at least one (see the reasons with -v)"
        )

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(manifest_path, sink.getvalue().to_pybytes())
    atomic_write_json(labels_path, {"classes": classes})
    _log_summary(rows, classes)
    return table


def _log_summary(rows: dict[str, list], classes: list[str]) -> None:
    ok = [s == "ok" for s in rows["status"]]
    counts = {s: sum(o and sp == s for o, sp in zip(ok, rows["split"])) for s in ("train", "val", "test")}
    log.info("split: %d files, %d classes, usable %s", len(ok), len(classes), counts)
    reasons = Counter(s.split(":")[0] for s in rows["status"] if s != "ok")
    for reason, n in sorted(reasons.items()):
        log.warning("split: excluded %d file(s): %s", n, reason)
    for path, status in zip(rows["path"], rows["status"]):
        if status != "ok":
            log.debug("split: excluded %s: %s", path, status)
    for digest, names in sorted(_conflicting_duplicates(rows).items()):
        paths = [p for p, d in zip(rows["path"], rows["sha256"]) if d == digest]
        log.warning("split: identical image under classes %s (sha256 %s...): %s", sorted(names), digest[:12], paths)
