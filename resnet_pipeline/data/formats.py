"""Converters from official dataset layouts to an image folder (one sub-folder per class).

- CIFAR-10, binary version: `cifar-10-batches-bin/` with `batches.meta.txt` and six `.bin` batches of
  3073-byte records (label byte, then 1024 R, 1024 G, 1024 B bytes of a row-major 32x32 image).
- PASCAL VOC 2012: `VOCdevkit/VOC2012/` with `JPEGImages/`, `Annotations/` and `ImageSets/Main/`;
  each listed image is labelled with the class of its largest object.

Everything is checked before anything is written (except CIFAR label bytes, checked per batch);
malformed input raises `FormatError` naming the file and what was expected.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from tqdm import tqdm

from resnet_pipeline.data.images import png_bytes
from resnet_pipeline.fileio import link_or_copy

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
VOC2012_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC2012_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
CIFAR10_SIDE = 32
CIFAR10_RECORD = 1 + 3 * CIFAR10_SIDE * CIFAR10_SIDE  # 3073

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")  # a class / image id usable as a file name


class FormatError(ValueError):
    """A dataset file is missing or not in the expected format; `path` names the file."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


# ---------------------------------------------------------------- CIFAR-10


def _find_cifar_root(extracted: Path) -> Path:
    if (extracted / "batches.meta.txt").is_file():
        return extracted
    if (extracted / CIFAR10_DIR).is_dir():
        return extracted / CIFAR10_DIR
    found = sorted(p.parent for p in extracted.rglob("batches.meta.txt"))
    if len(found) == 1:
        return found[0]
    raise FormatError(
        extracted / CIFAR10_DIR / "batches.meta.txt",
        f"missing: expected one CIFAR-10 binary folder, found {len(found)}",
    )


def _read_class_names(meta: Path) -> list[str]:
    if not meta.is_file():
        raise FormatError(meta, "missing: expected the class names, one per line")
    names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line, name in enumerate(names, 1):
        if not _SAFE_NAME.match(name):
            raise FormatError(meta, f"class name {name!r} (line {line}) is not usable as a folder name")
    if not names or len(set(names)) != len(names):
        raise FormatError(meta, f"expected distinct class names, one per line, got {names}")
    return names


def cifar10_binary_to_folder(extracted: Path, out_dir: Path) -> int:
    """Write every CIFAR-10 record as out_dir/<class>/<batch stem>_<index:05d>.png; return the count.

    `extracted` is the folder holding `cifar-10-batches-bin/`, or that folder itself.
    """
    root = _find_cifar_root(Path(extracted))
    out_dir = Path(out_dir)
    names = _read_class_names(root / "batches.meta.txt")
    batches = [root / name for name in CIFAR10_BATCHES]
    for batch in batches:  # sizes first: fail before writing anything
        if not batch.is_file():
            raise FormatError(batch, f"missing: expected a batch of {CIFAR10_RECORD}-byte records")
        size = batch.stat().st_size
        if size == 0 or size % CIFAR10_RECORD:
            raise FormatError(batch, f"size {size} is not a positive multiple of the record size {CIFAR10_RECORD}")
    for name in names:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    count = 0
    for batch in batches:
        records = np.fromfile(batch, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
        labels = records[:, 0]
        bad = np.flatnonzero(labels >= len(names))
        if bad.size:
            raise FormatError(
                batch,
                f"record {int(bad[0])}: label byte {int(labels[bad[0]])}, "
                f"expected < {len(names)} (the classes in batches.meta.txt)",
            )
        # Planes R, G, B of row-major 32x32 -> height x width x channel.
        images = records[:, 1:].reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE).transpose(0, 2, 3, 1)
        for index in tqdm(range(len(records)), desc=f"cifar10 {batch.stem}", unit="img", disable=None):
            target = out_dir / names[labels[index]] / f"{batch.stem}_{index:05d}.png"
            target.write_bytes(png_bytes(np.ascontiguousarray(images[index])))
        count += len(records)
    log.info("cifar10: %d images in %d classes -> %s", count, len(names), out_dir)
    return count


# ---------------------------------------------------------------- PASCAL VOC


def _find_voc_root(extracted: Path) -> Path:
    for candidate in (extracted / "VOCdevkit" / "VOC2012", extracted / "VOC2012", extracted):
        if (candidate / "Annotations").is_dir():
            return candidate
    found = sorted(p.parent for p in extracted.rglob("Annotations") if p.is_dir())
    if len(found) == 1:
        return found[0]
    raise FormatError(
        extracted / "VOCdevkit" / "VOC2012" / "Annotations",
        f"missing: expected one VOC folder (Annotations, JPEGImages, ImageSets), found {len(found)}",
    )


def _read_ids(listing: Path) -> list[str]:
    if not listing.is_file():
        raise FormatError(listing, "missing: expected the image ids, one per line")
    ids: list[str] = []
    for line_no, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if not _SAFE_NAME.match(image_id):
            raise FormatError(listing, f"line {line_no}: {image_id!r} is not an image id")
        ids.append(image_id)
    if len(set(ids)) != len(ids):
        raise FormatError(listing, "expected each image id once")
    return ids


def _box_area(xml_path: Path, index: int, obj: ET.Element) -> float:
    box = obj.find("bndbox")
    try:
        x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr,arg-type]
    except (AttributeError, TypeError, ValueError):
        raise FormatError(xml_path, f"object {index}: expected bndbox with numeric xmin, ymin, xmax, ymax") from None
    # VOC boxes are 1-based inclusive pixel coordinates (some VOC2012 files use decimals).
    return max(0.0, x1 - x0 + 1) * max(0.0, y1 - y0 + 1)


def _annotation_classes(xml_path: Path) -> list[tuple[str, float]]:
    """The (class, box area) of each top-level object of a VOC annotation, in file order."""
    if not xml_path.is_file():
        raise FormatError(xml_path, "missing: expected the image's VOC annotation")
    data = xml_path.read_bytes()
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise FormatError(xml_path, "expected a VOC annotation without DTD or entities")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise FormatError(xml_path, f"expected well-formed XML ({exc})") from None
    if root.tag != "annotation":
        raise FormatError(xml_path, f"expected root element <annotation>, got <{root.tag}>")
    objects = []
    for index, obj in enumerate(root.findall("object")):  # direct children only: <part> has <name> too
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise FormatError(xml_path, f"object {index}: class {name!r} is not one of the 20 VOC classes")
        objects.append((name, _box_area(xml_path, index, obj)))
    return objects


def voc_to_folder(
    extracted: Path, out_dir: Path, *, drop_multiclass: bool = False, image_set: str = "trainval"
) -> dict:
    """Copy each listed VOC image to out_dir/<class of its largest object>/<id>.jpg; return a summary.

    Ties in area go to the first object in the file; difficult objects count. Images without objects
    are skipped; with `drop_multiclass`, so are those whose objects span several classes.
    """
    root = _find_voc_root(Path(extracted))
    out_dir = Path(out_dir)
    if not _SAFE_NAME.match(image_set):
        raise ValueError(f"image_set {image_set!r} is not a file name")
    ids = _read_ids(root / "ImageSets" / "Main" / f"{image_set}.txt")
    plan: list[tuple[Path, str, str]] = []
    dropped = no_object = 0
    for image_id in tqdm(ids, desc=f"voc {image_set} annotations", unit="img", disable=None):
        objects = _annotation_classes(root / "Annotations" / f"{image_id}.xml")
        jpeg = root / "JPEGImages" / f"{image_id}.jpg"
        if not jpeg.is_file():
            raise FormatError(jpeg, "missing: expected the JPEG of a listed image")
        if not objects:
            no_object += 1
            continue
        if drop_multiclass and len({name for name, _ in objects}) > 1:
            dropped += 1
            continue
        label = max(objects, key=lambda o: o[1])[0]  # max keeps the first of equal areas
        plan.append((jpeg, label, image_id))
    per_class = dict.fromkeys(VOC_CLASSES, 0)
    for jpeg, label, image_id in tqdm(plan, desc=f"voc {image_set} images", unit="img", disable=None):
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        link_or_copy(jpeg, out_dir / label / f"{image_id}.jpg")
        per_class[label] += 1
    summary = {
        "images": len(plan),
        "dropped_multiclass": dropped,
        "skipped_no_object": no_object,
        "per_class": per_class,
    }
    log.info("voc2012 %s: %s -> %s", image_set, summary, out_dir)
    return summary
