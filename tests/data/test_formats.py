"""Official-layout converters (CIFAR-10 binary, PASCAL VOC 2012) on fake archives in the real layouts."""

from __future__ import annotations

import collections
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_pipeline.data.formats import (
    VOC_CLASSES,
    FormatError,
    cifar10_binary_to_folder,
    voc_to_folder,
)
from tests.data.fakes import (
    CIFAR10_BATCHES,
    CIFAR10_NAMES,
    voc_expected,
    write_cifar10_binary_tarball,
    write_voc2012_tar,
)

PER_BATCH = 20


def _extract(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cifar(tmp_path) -> Path:
    data = write_cifar10_binary_tarball(tmp_path / "cifar-10-binary.tar.gz", per_batch=PER_BATCH, seed=3)
    return _extract(data, tmp_path / "extracted")


@pytest.fixture
def voc(tmp_path) -> Path:
    data = write_voc2012_tar(tmp_path / "VOCtrainval_11-May-2012.tar", n_images=12, seed=3)
    return _extract(data, tmp_path / "extracted")


# ---------------------------------------------------------------- fakes


def test_fakes_are_deterministic_and_in_the_official_layout(tmp_path):
    a = write_cifar10_binary_tarball(tmp_path / "a.tar.gz")
    assert a == write_cifar10_binary_tarball(tmp_path / "b.tar.gz") == (tmp_path / "a.tar.gz").read_bytes()
    assert a != write_cifar10_binary_tarball(tmp_path / "c.tar.gz", seed=1)
    with tarfile.open(fileobj=io.BytesIO(a), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert names == {
        "cifar-10-batches-bin",
        "cifar-10-batches-bin/batches.meta.txt",
        "cifar-10-batches-bin/readme.html",
    } | {f"cifar-10-batches-bin/{b}" for b in CIFAR10_BATCHES}

    v = write_voc2012_tar(tmp_path / "v.tar")
    assert v == write_voc2012_tar(tmp_path / "w.tar")
    with tarfile.open(fileobj=io.BytesIO(v), mode="r:") as tar:  # plain tar, like the official one
        names = set(tar.getnames())
    assert "VOCdevkit/VOC2012/ImageSets/Main/trainval.txt" in names
    assert "VOCdevkit/VOC2012/JPEGImages/2012_000001.jpg" in names
    assert "VOCdevkit/VOC2012/Annotations/2012_000012.xml" in names


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_counts_and_class_folders(cifar, tmp_path):
    out = tmp_path / "out"
    assert cifar10_binary_to_folder(cifar, out) == 6 * PER_BATCH
    assert sorted(p.name for p in out.iterdir()) == sorted(CIFAR10_NAMES)
    per_class = collections.Counter(p.parent.name for p in out.rglob("*.png"))
    assert per_class == {name: 6 * PER_BATCH // 10 for name in CIFAR10_NAMES}
    # Record i of each batch has label i % 10, so its file sits in that class's folder.
    assert (out / "airplane" / "data_batch_1_00000.png").is_file()
    assert (out / "truck" / "test_batch_00019.png").is_file()
    assert (out / "automobile" / "data_batch_5_00011.png").is_file()


def test_cifar10_pixels_are_the_record_bytes(cifar, tmp_path):
    out = tmp_path / "out"
    cifar10_binary_to_folder(cifar, out)
    raw = (cifar / "cifar-10-batches-bin" / "data_batch_2.bin").read_bytes()
    for index in (0, 7, PER_BATCH - 1):
        record = raw[index * 3073 : (index + 1) * 3073]
        with Image.open(out / CIFAR10_NAMES[record[0]] / f"data_batch_2_{index:05d}.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            pixels = np.asarray(im)
        # Pixel (row 1, column 2): R at 1 + 32 + 2, G 1024 further, B 2048 further.
        assert tuple(pixels[1, 2]) == (record[1 + 34], record[1 + 1024 + 34], record[1 + 2048 + 34])
        planes = np.frombuffer(record[1:], dtype=np.uint8).reshape(3, 32, 32)
        np.testing.assert_array_equal(pixels, planes.transpose(1, 2, 0))


def test_cifar10_accepts_the_batches_folder_and_is_deterministic(cifar, tmp_path):
    cifar10_binary_to_folder(cifar, tmp_path / "one")
    assert cifar10_binary_to_folder(cifar / "cifar-10-batches-bin", tmp_path / "two") == 6 * PER_BATCH
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def _cifar_error(cifar: Path, tmp_path: Path) -> str:
    with pytest.raises(FormatError) as info:
        cifar10_binary_to_folder(cifar, tmp_path / "out")
    return str(info.value)


def test_cifar10_missing_files(cifar, tmp_path):
    batches = cifar / "cifar-10-batches-bin"
    (batches / "data_batch_3.bin").unlink()
    assert "data_batch_3.bin" in _cifar_error(cifar, tmp_path)
    (batches / "batches.meta.txt").unlink()
    assert "batches.meta.txt" in _cifar_error(batches, tmp_path)


def test_cifar10_truncated_batch(cifar, tmp_path):
    batch = cifar / "cifar-10-batches-bin" / "test_batch.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    message = _cifar_error(cifar, tmp_path)
    assert "test_batch.bin" in message and "3073" in message
    assert not list((tmp_path / "out").rglob("*.png"))  # checked before anything is written


def test_cifar10_label_out_of_range(cifar, tmp_path):
    batch = cifar / "cifar-10-batches-bin" / "data_batch_4.bin"
    raw = bytearray(batch.read_bytes())
    raw[5 * 3073] = 10
    batch.write_bytes(bytes(raw))
    message = _cifar_error(cifar, tmp_path)
    assert "data_batch_4.bin" in message and "record 5" in message and "label byte 10" in message


def test_cifar10_bad_class_name(cifar, tmp_path):
    (cifar / "cifar-10-batches-bin" / "batches.meta.txt").write_text("airplane\n../escape\n")
    assert "batches.meta.txt" in _cifar_error(cifar, tmp_path)


# ---------------------------------------------------------------- VOC 2012


def test_voc_labels_are_the_largest_box_class(voc, tmp_path):
    out = tmp_path / "out"
    summary = voc_to_folder(voc, out)
    expected = voc_expected(12)
    found = {p.stem: p.parent.name for p in out.rglob("*.jpg")}
    assert found == {image_id: label for image_id, (label, _) in expected.items()}
    assert "2012_999999" not in found  # annotated but not listed in trainval.txt
    assert summary["images"] == 12 and summary["dropped_multiclass"] == 0 and summary["skipped_no_object"] == 0
    assert set(summary["per_class"]) == set(VOC_CLASSES)
    assert {k: v for k, v in summary["per_class"].items() if v} == collections.Counter(found.values())


def test_voc_files_are_byte_identical(voc, tmp_path):
    out = tmp_path / "out"
    voc_to_folder(voc, out)
    jpegs = voc / "VOCdevkit" / "VOC2012" / "JPEGImages"
    for path in out.rglob("*.jpg"):
        assert path.read_bytes() == (jpegs / path.name).read_bytes()


def test_voc_drop_multiclass(voc, tmp_path):
    summary = voc_to_folder(voc, tmp_path / "out", drop_multiclass=True)
    expected = voc_expected(12)
    kept = {p.stem: p.parent.name for p in (tmp_path / "out").rglob("*.jpg")}
    assert kept == {image_id: label for image_id, (label, multi) in expected.items() if not multi}
    assert summary["dropped_multiclass"] == sum(multi for _, multi in expected.values()) == 7
    assert summary["images"] == len(kept) == 5


def test_voc_image_set_and_no_object(voc, tmp_path):
    root = voc / "VOCdevkit" / "VOC2012"
    xml = root / "Annotations" / "2012_000002.xml"
    text = xml.read_text()
    xml.write_text(text[: text.index("\t<object>")] + "</annotation>\n")
    summary = voc_to_folder(voc, tmp_path / "out", image_set="train")
    assert summary["images"] == 5 and summary["skipped_no_object"] == 1
    assert sorted(p.stem for p in (tmp_path / "out").rglob("*.jpg")) == [
        "2012_000001",
        "2012_000003",
        "2012_000004",
        "2012_000005",
        "2012_000006",
    ]


def _voc_error(voc: Path, tmp_path: Path, **kwargs) -> str:
    with pytest.raises(FormatError) as info:
        voc_to_folder(voc, tmp_path / "out", **kwargs)
    return str(info.value)


def test_voc_missing_files(voc, tmp_path):
    root = voc / "VOCdevkit" / "VOC2012"
    (root / "JPEGImages" / "2012_000007.jpg").unlink()
    assert "2012_000007.jpg" in _voc_error(voc, tmp_path)
    (root / "Annotations" / "2012_000004.xml").unlink()
    assert "2012_000004.xml" in _voc_error(voc, tmp_path)
    assert "test.txt" in _voc_error(voc, tmp_path, image_set="test")
    assert not (tmp_path / "out").exists()  # all checked before anything is written


def test_voc_malformed_xml(voc, tmp_path):
    xml = voc / "VOCdevkit" / "VOC2012" / "Annotations" / "2012_000003.xml"
    xml.write_bytes(xml.read_bytes()[:-30])
    message = _voc_error(voc, tmp_path)
    assert "2012_000003.xml" in message and "XML" in message


def test_voc_unknown_class(voc, tmp_path):
    xml = voc / "VOCdevkit" / "VOC2012" / "Annotations" / "2012_000008.xml"
    xml.write_text(xml.read_text().replace("<name>cow</name>", "<name>wolf</name>"))
    message = _voc_error(voc, tmp_path)
    assert "2012_000008.xml" in message and "object 2" in message and "wolf" in message


def test_voc_bad_box(voc, tmp_path):
    xml = voc / "VOCdevkit" / "VOC2012" / "Annotations" / "2012_000001.xml"
    xml.write_text(xml.read_text().replace("<xmax>60</xmax>", "<xmax>sixty</xmax>"))
    message = _voc_error(voc, tmp_path)
    assert "2012_000001.xml" in message and "object 0" in message


def test_voc_rejects_entities(voc, tmp_path):
    xml = voc / "VOCdevkit" / "VOC2012" / "Annotations" / "2012_000001.xml"
    xml.write_text('<!DOCTYPE annotation [<!ENTITY a "dog">]>\n' + xml.read_text().replace("dog", "&a;"))
    assert "2012_000001.xml" in _voc_error(voc, tmp_path)
