"""The files stages hand each other: their names and schema (`SCHEMA` of `manifest.parquet`,
`INDEX` of the shards folder, `shard_name`), and the checks where they are read: manifest rows
(shard stage) and `shards/index.json` (train, evaluate). These files are ours, but can be edited or
tampered with; every error names the file and the row or entry, and what was expected."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from resnet_pipeline.data.images import REASONS
from resnet_pipeline.fileio import read_json, sha256_file

SPLITS = ("train", "val", "test")
INDEX = "index.json"  # the shards folder's list of shards, record counts and sha256
SCHEMA = pa.schema(  # manifest.parquet: one row per image
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
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"^(train|val|test)-(\d{5})-of-(\d{5})\.tfrecord$")


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def read_manifest(path: str | Path) -> pa.Table:
    """The manifest at `path`, with every column of `SCHEMA` (a clear error if it is missing)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found; run the split stage first")
    table = pq.read_table(path)
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; expected {SCHEMA.names}")
    return table


class ContractError(ValueError):
    """A manifest row, labels.json or index.json entry the pipeline cannot trust."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def relative_inside(path: Any) -> str | None:
    """Why `path` is not a relative POSIX path that stays inside its root, or None."""
    if not isinstance(path, str) or not path:
        return "expected a non-empty relative path"
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return "absolute path"
    if "\\" in path or "\0" in path:
        return "backslash or NUL in the path"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' or empty component"
    return None


def read_classes(labels_path: str | Path) -> list[str]:
    """The class names of labels.json, checked: distinct non-empty strings."""
    labels = read_json(labels_path, "labels.json")
    classes = labels.get("classes") if isinstance(labels, dict) else None
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ContractError(f'{labels_path}: expected {{"classes": [distinct class names]}}, received {labels!r:.200}')
    return classes


def _row_problem(row: dict, classes: list[str]) -> str | None:
    if why := relative_inside(row.get("path")):
        return f"path {row.get('path')!r}: {why}; expected a path relative to raw/"
    label = row.get("label")
    if not isinstance(label, int) or not _is_int(label) or not 0 <= label < len(classes):
        return f"label {label!r}: expected an integer in 0..{len(classes) - 1} (the classes of labels.json)"
    if row.get("label_name") != classes[label]:
        return f"label_name {row.get('label_name')!r}: labels.json names class {label} {classes[label]!r}"
    if row.get("split") not in SPLITS:
        return f"split {row.get('split')!r}: expected one of {', '.join(SPLITS)}"
    status = row.get("status")
    if not isinstance(status, str) or (status != "ok" and status.split(":")[0] not in REASONS):
        return f"status {status!r}: expected 'ok' or one of the reasons {', '.join(REASONS)}"
    if not isinstance(row.get("sha256"), str) or not _HEX64.match(row["sha256"]):
        return f"sha256 {row.get('sha256')!r}: expected 64 lowercase hexadecimal digits"
    if not _is_int(row.get("bytes")) or row["bytes"] < 0:
        return f"bytes {row.get('bytes')!r}: expected a count >= 0"
    return None


def check_manifest_rows(rows: list[dict], manifest_path: str | Path, classes: list[str]) -> None:
    """Refuse the manifest at its first bad row, naming the row number and path."""
    for number, row in enumerate(rows):
        if problem := _row_problem(row, classes):
            raise ContractError(f"{manifest_path}: row {number}: {problem}; rerun the split stage")


def _entry_problem(entry: Any, shards_dir: Path) -> str | None:
    if not isinstance(entry, dict):
        return "expected an object with file, split, records, sha256"
    name = entry.get("file")
    match = _SHARD.match(name) if isinstance(name, str) else None
    if not match:
        return f"file {name!r}: expected a shard name SPLIT-NNNNN-of-MMMMM.tfrecord"
    if entry.get("split") != match.group(1):
        return f"split {entry.get('split')!r} differs from the shard name {name!r}"
    if not _is_int(entry.get("records")) or entry["records"] < 0:
        return f"records {entry.get('records')!r}: expected a count >= 0"
    if not isinstance(entry.get("sha256"), str) or not _HEX64.match(entry["sha256"]):
        return f"sha256 {entry.get('sha256')!r}: expected 64 lowercase hexadecimal digits"
    path = shards_dir / str(name)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return f"{path} is missing"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return None


def check_index(index: Any, shards_dir: str | Path, split: str, verify_hashes: bool = True) -> list[dict]:
    """The checked entries of `split` in index.json: names, counts and files (and their sha256)."""
    shards_dir = Path(shards_dir)
    where = shards_dir / "index.json"
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ContractError(f'{where}: expected {{"splits": ..., "shards": [...]}}; rerun the shard stage')
    entries = [
        e
        for e in index["shards"]
        if not isinstance(e, dict) or e.get("split") == split or str(e.get("file", "")).startswith(f"{split}-")
    ]
    names = []
    for number, entry in enumerate(entries):
        if problem := _entry_problem(entry, shards_dir):
            raise ContractError(f"{where}: shard entry {number} of split {split!r}: {problem}; rerun the shard stage")
        names.append(entry["file"])
    totals = {int(_SHARD.match(n).group(3)) for n in names}  # type: ignore[union-attr]
    if len(set(names)) != len(names) or (names and totals != {len(names)}):
        raise ContractError(
            f"{where}: split {split!r} lists {len(names)} shard(s) {names[:3]}..., "
            f"named as of {sorted(totals)}; expected each of the M shards once"
        )
    if verify_hashes:
        for entry in entries:
            if sha256_file(shards_dir / entry["file"]) != entry["sha256"]:
                raise ContractError(
                    f"{shards_dir / entry['file']}: sha256 differs from index.json's; "
                    "the shard changed after it was written: rerun the shard stage"
                )
    return entries
