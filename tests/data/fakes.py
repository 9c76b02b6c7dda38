"""Small fake datasets in the real official archive layouts (CIFAR-10 binary, PASCAL VOC 2012).

Archives are deterministic for a given seed (fixed mtimes, owners and gzip header) and returned as
bytes as well as written, so tests can serve them over HTTP.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
VOC_SIZE = (64, 48)  # width, height of the fake JPEGs
_MTIME = 1_200_000_000

# Objects of each fake VOC image: (class, xmin, ymin, xmax, ymax, difficult), then the expected label
# (class of the largest box, first on ties) written out by hand, and whether the classes differ.
VOC_SPEC: tuple[tuple[tuple[tuple[str, float, float, float, float, int], ...], str, bool], ...] = (
    ((("dog", 5, 5, 60, 44, 0),), "dog", False),
    ((("cat", 1, 1, 20, 20, 0), ("cat", 10, 10, 50, 40, 0)), "cat", False),
    ((("person", 1, 1, 10, 10, 0), ("car", 5, 5, 64, 48, 0)), "car", True),  # largest is not first
    ((("bicycle", 2, 2, 40, 40, 0), ("person", 30, 10, 50, 30, 0)), "bicycle", True),
    ((("chair", 1, 1, 10, 10, 0), ("diningtable", 11, 11, 20, 20, 0)), "chair", True),  # tie: first
    ((("bottle", 1, 1, 60, 45, 1), ("tvmonitor", 5, 5, 15, 15, 0)), "bottle", True),  # difficult counts
    ((("aeroplane", 1, 1, 64, 48, 0),), "aeroplane", False),
    ((("sheep", 10, 10, 20, 20, 0), ("sheep", 1, 1, 12, 30, 0), ("cow", 1, 1, 30, 40, 0)), "cow", True),
    ((("horse", 2.5, 3.0, 50.5, 40.0, 0), ("horse", 1, 1, 5, 5, 1)), "horse", False),  # decimal coords
    ((("motorbike", 1, 1, 20, 20, 0), ("person", 10, 2, 60, 47, 0)), "person", True),  # person has <part>s
    ((("train", 1, 5, 64, 40, 0),), "train", False),
    (
        (
            ("bird", 1, 1, 5, 5, 0),
            ("boat", 1, 1, 6, 6, 0),
            ("bus", 1, 1, 7, 7, 0),
            ("pottedplant", 20, 10, 50, 40, 0),
            ("sofa", 1, 1, 8, 8, 0),
        ),
        "pottedplant",
        True,
    ),
)


def voc_id(index: int) -> str:
    """The id of the index-th fake VOC image (0-based): 2012_000001, 2012_000002, ..."""
    return f"2012_{index + 1:06d}"


def voc_expected(n_images: int = 12) -> dict[str, tuple[str, bool]]:
    """id -> (expected label, spans several classes) for write_voc2012_tar(n_images=...)."""
    return {voc_id(i): VOC_SPEC[i % len(VOC_SPEC)][1:] for i in range(n_images)}  # type: ignore[misc]


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = _MTIME, 1000, 1000, "user", "user"
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries:
            _add(tar, name, data)
    return buf.getvalue()


def write_cifar10_binary_tarball(path: Path, per_batch: int = 20, seed: int = 0) -> bytes:
    """Write a cifar-10-binary.tar.gz look-alike with per_batch records per batch; return its bytes.

    Pixels are random; the label of record i of each batch is i % 10.
    """
    rng = np.random.default_rng(seed)
    top = "cifar-10-batches-bin/"
    # The real batches.meta.txt ends with a blank line.
    entries: list[tuple[str, bytes | None]] = [
        (top, None),
        (top + "batches.meta.txt", ("\n".join(CIFAR10_NAMES) + "\n\n").encode()),
    ]
    for batch in CIFAR10_BATCHES:
        records = rng.integers(0, 256, size=(per_batch, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(per_batch) % 10
        entries.append((top + batch, records.tobytes()))
    entries.append(
        (
            top + "readme.html",
            b'<meta HTTP-EQUIV="REFRESH" content="0; url=http://www.cs.toronto.edu/~kriz/cifar.html">\n',
        )
    )
    data = gzip.compress(_tar(entries), mtime=0)
    Path(path).write_bytes(data)
    return data


def _jpeg(rng: np.random.Generator) -> bytes:
    width, height = VOC_SIZE
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(-40, 41, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _voc_xml(image_id: str, objects: tuple[tuple[str, float, float, float, float, int], ...]) -> bytes:
    width, height = VOC_SIZE
    parts = [
        "<annotation>",
        "\t<folder>VOC2012</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>The VOC2012 Database</database>",
        "\t\t<annotation>PASCAL VOC2012</annotation>",
        "\t\t<image>flickr</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, x0, y0, x1, y1, difficult in objects:
        parts += [
            "\t<object>",
            f"\t\t<name>{name}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{difficult}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{_fmt(x0)}</xmin>",
            f"\t\t\t<ymin>{_fmt(y0)}</ymin>",
            f"\t\t\t<xmax>{_fmt(x1)}</xmax>",
            f"\t\t\t<ymax>{_fmt(y1)}</ymax>",
            "\t\t</bndbox>",
        ]
        if name == "person":  # the layout annotations: parts with their own <name>, not a VOC class
            for part, (px0, py0) in (("head", (x0 + 1, y0 + 1)), ("hand", (x0 + 2, y0 + 3))):
                parts += [
                    "\t\t<part>",
                    f"\t\t\t<name>{part}</name>",
                    "\t\t\t<bndbox>",
                    f"\t\t\t\t<xmin>{_fmt(px0)}</xmin>",
                    f"\t\t\t\t<ymin>{_fmt(py0)}</ymin>",
                    f"\t\t\t\t<xmax>{_fmt(px0 + 2)}</xmax>",
                    f"\t\t\t\t<ymax>{_fmt(py0 + 2)}</ymax>",
                    "\t\t\t</bndbox>",
                    "\t\t</part>",
                ]
        parts.append("\t</object>")
    parts.append("</annotation>\n")
    return "\n".join(parts).encode()


def write_voc2012_tar(path: Path, n_images: int = 12, seed: int = 0) -> bytes:
    """Write a VOCtrainval_11-May-2012.tar look-alike with n_images listed in trainval; return its bytes.

    Objects follow VOC_SPEC (cycled); labels are given by voc_expected(n_images). An extra annotated
    image not in any ImageSets list is included, as in the real archive.
    """
    rng = np.random.default_rng(seed)
    top = "VOCdevkit/VOC2012/"
    ids = [voc_id(i) for i in range(n_images)]
    entries: list[tuple[str, bytes | None]] = [
        ("VOCdevkit/", None),
        (top, None),
        (top + "Annotations/", None),
        (top + "ImageSets/", None),
        (top + "ImageSets/Main/", None),
        (top + "JPEGImages/", None),
    ]
    for i, image_id in enumerate(ids + ["2012_999999"]):
        objects = VOC_SPEC[i % len(VOC_SPEC)][0]
        entries.append((top + f"Annotations/{image_id}.xml", _voc_xml(image_id, objects)))
        entries.append((top + f"JPEGImages/{image_id}.jpg", _jpeg(rng)))
    half = n_images // 2
    for image_set, listed in (("train", ids[:half]), ("val", ids[half:]), ("trainval", ids)):
        entries.append((top + f"ImageSets/Main/{image_set}.txt", "".join(f"{i}\n" for i in listed).encode()))
        for cls in ("cat", "dog"):  # per-class lists: "<id> -1|  1|  0"
            present = {i: any(o[0] == cls for o in VOC_SPEC[ids.index(i) % len(VOC_SPEC)][0]) for i in listed}
            text = "".join(f"{i} {' 1' if p else '-1'}\n" for i, p in present.items())
            entries.append((top + f"ImageSets/Main/{cls}_{image_set}.txt", text.encode()))
    data = _tar(entries)
    Path(path).write_bytes(data)
    return data
