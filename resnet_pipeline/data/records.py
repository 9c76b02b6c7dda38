"""`tf.train.Example` records and TFRecord files written without TensorFlow, so that shard
workers start in a blink.

The encoding is protobuf's wire format for `Example{features: Features{feature: map<string,
Feature>}}` with the map sorted by key, which is what
`tf.train.Example.SerializeToString(deterministic=True)` writes; the file framing is TFRecord's
(length, masked CRC-32C of the length, data, masked CRC-32C of the data), as `tf.io.TFRecordWriter`
writes it. Tests hold both byte-equal to TensorFlow's.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import google_crc32c

from resnet_pipeline.data.images import prepare
from resnet_pipeline.fileio import read_regular, sha256_bytes, sha256_file


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value: bytes | int) -> bytes:
    if isinstance(value, bytes):  # Feature.bytes_list = 1, BytesList.value = 1
        return _field(1, _field(1, value))
    # Feature.int64_list = 3, Int64List.value = 1 (packed)
    return _field(3, _field(1, _varint(value)))


def encode_example(features: dict[str, bytes | int]) -> bytes:
    """Serialized `tf.train.Example` of bytes and int64 features, map entries sorted by key."""
    entries = b"".join(
        _field(1, _field(1, key.encode()) + _field(2, _feature(features[key]))) for key in sorted(features)
    )
    return _field(1, entries)


def read_inside(root: str | Path, relative: str) -> bytes:
    """The bytes of the regular file `root/relative`, refused if any link takes it out of `root`."""
    path = Path(root) / relative
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise ValueError(f"{path}: resolves to {real}, outside {base}; the manifest's paths must stay in raw/")
    return read_regular(path)


def make_record(raw_dir: str | Path, row: dict, max_shorter_side: int = 0, jpeg_quality: int = 90) -> bytes:
    """The serialized Example of one manifest row, with the keys of the README's "Shards" (Model Garden's).

    Raises ValueError naming the file if its content changed since the manifest was written.
    """
    path = Path(raw_dir) / row["path"]
    data = read_inside(raw_dir, row["path"])
    if sha256_bytes(data) != row["sha256"]:
        raise ValueError(
            f"{path}: content changed since the manifest was written (sha256 differs from the manifest's); "
            "rerun the split stage"
        )
    image = prepare(data, max_shorter_side, jpeg_quality)
    return encode_example(
        {
            "image/encoded": image.data,
            "image/format": image.format.encode(),
            "image/class/label": row["label"],
            "image/class/text": row["label_name"].encode(),
            "image/height": image.height,
            "image/width": image.width,
            "image/filename": row["path"].encode(),
            "image/sha256": row["sha256"].encode(),
        }
    )


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord_bytes(record: bytes) -> bytes:
    """One record framed as in a TFRecord file."""
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


def write_tfrecord(path: str | Path, records: Iterable[bytes]) -> int:
    """Write `records` as a TFRecord file (uncompressed); return how many."""
    count = 0
    with open(path, "wb") as f:
        for record in records:
            f.write(tfrecord_bytes(record))
            count += 1
    return count


def write_shard_file(
    plan: dict, raw_dir: str | Path, out_dir: str | Path, max_shorter_side: int = 0, jpeg_quality: int = 90
) -> dict:
    """Write the records of one planned shard (`{"file", "split", "rows"}`) into `out_dir`; return
    its index entry (file, split, records, sha256). Lives here, light to import, for the shard workers."""
    path = Path(out_dir) / plan["file"]
    count = write_tfrecord(path, (make_record(raw_dir, row, max_shorter_side, jpeg_quality) for row in plan["rows"]))
    return {"file": plan["file"], "split": plan["split"], "records": count, "sha256": sha256_file(path)}


def framed_records(rows: list[dict], raw_dir: str | Path, max_shorter_side: int = 0, jpeg_quality: int = 90) -> bytes:
    """The TFRecord-framed records of consecutive manifest rows: a piece of a shard file."""
    return b"".join(tfrecord_bytes(make_record(raw_dir, row, max_shorter_side, jpeg_quality)) for row in rows)
