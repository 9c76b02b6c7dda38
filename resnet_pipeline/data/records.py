"""`tf.train.Example` records built without TensorFlow, so that shard workers start in a blink.

The encoding is protobuf's wire format for `Example{features: Features{feature: map<string,
Feature>}}` with the map sorted by key, which is what
`tf.train.Example.SerializeToString(deterministic=True)` writes (a test holds the two equal).
"""

from __future__ import annotations

from pathlib import Path

from resnet_pipeline.data.images import prepare
from resnet_pipeline.fileio import sha256_bytes


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


def make_record(raw_dir: str | Path, row: dict, max_shorter_side: int = 0, jpeg_quality: int = 95) -> bytes:
    """The serialized Example of one manifest row, with the design.md keys.

    Raises ValueError naming the file if its content changed since the manifest was written.
    """
    path = Path(raw_dir) / row["path"]
    data = path.read_bytes()
    if sha256_bytes(data) != row["sha256"]:
        raise ValueError(
            f"{path}: content changed since the manifest was written (sha256 differs from the manifest's); "
            "rerun the split stage"
        )
    image = prepare(data, max_shorter_side, jpeg_quality)
    return encode_example({
        "image/encoded": image.data,
        "image/format": image.format.encode(),
        "image/class/label": row["label"],
        "image/class/text": row["label_name"].encode(),
        "image/height": image.height,
        "image/width": image.width,
        "image/filename": row["path"].encode(),
        "image/sha256": row["sha256"].encode(),
    })
