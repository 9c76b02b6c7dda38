"""The split stage against hostile image folders: links out of the dataset, images Pillow opens
but TensorFlow refuses, empty class folders, and a delayed-link archive through the download stage.

TensorFlow's own `tf.io.decode_image` (what training uses) is the judge of "decodable" here.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from resnet_pipeline.config import DownloadConfig, SplitConfig
from resnet_pipeline.data.archive import UnsafeArchiveError
from resnet_pipeline.data.download import download
from resnet_pipeline.data.images import inspect, prepare
from resnet_pipeline.data.split import split

SEED = 42


def _png(rng: np.random.Generator, w: int = 16, h: int = 12, mode: str = "RGB") -> bytes:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rng: np.random.Generator, w: int = 16, h: int = 12, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _tf_decodes(data: bytes) -> bool:
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return False


def _folder(root: Path, per_class: int = 3, classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(3)
    folder = root / "raw" / "pets"
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            (folder / c / f"{i}.png").write_bytes(_png(rng))
    return folder


def _split(folder: Path, tmp_path: Path) -> dict[str, dict]:
    table = split(SplitConfig(), SEED, folder, tmp_path / "manifest.parquet", tmp_path / "labels.json")
    return {r["path"]: r for r in table.to_pylist()}


def test_png_cut_after_its_pixel_data_is_excluded_as_truncated(tmp_path):
    whole = _png(np.random.default_rng(0))
    cut = whole[: whole.rindex(b"IEND") - 4]  # every IDAT intact, no IEND
    with Image.open(io.BytesIO(cut)) as img:
        img.load()  # the premise: Pillow decodes it, pixel for pixel
    assert not _tf_decodes(cut) and _tf_decodes(whole)  # and TensorFlow refuses it
    folder = _folder(tmp_path)
    (folder / "cat" / "cut.png").write_bytes(cut)
    rows = _split(folder, tmp_path)
    assert rows["pets/cat/cut.png"]["status"] == "truncated: PNG ends before its IEND chunk"


def test_jpeg_cut_before_its_end_marker_is_excluded(tmp_path):
    whole = _jpeg(np.random.default_rng(1), 64, 48)
    status = inspect(whole[:-2]).status
    assert status.startswith("truncated") and not _tf_decodes(whole[:-2])


def _mutants(seed: int = 0) -> list[tuple[str, bytes]]:
    """Cuts, bit flips and byte bursts of PNGs (RGB, L, optimised) and JPEGs (baseline, progressive)."""
    rng, r = np.random.default_rng(seed), random.Random(seed)
    bases = []
    for i in range(6):
        w, h = r.randint(8, 40), r.randint(8, 40)
        bases += [
            _png(rng, w, h, "RGB" if i % 2 else "L"),
            _jpeg(rng, w, h, quality=80),
            _jpeg(rng, w, h, progressive=True),
        ]
    cases = []
    for data in bases:
        n = len(data)
        cases += [(f"cut {c}", data[:c]) for c in sorted({n - 1, n - 2, n - 4, n - 12, n - 16, n // 2, n * 3 // 4})]
        for _ in range(8):
            d = bytearray(data)
            d[r.randrange(n)] ^= 1 << r.randrange(8)
            cases.append(("flip", bytes(d)))
        for _ in range(3):
            d = bytearray(data)
            i = r.randrange(n)
            d[i : i + 8] = bytes(r.randrange(256) for _ in range(8))
            cases.append(("burst", bytes(d)))
        cases += [("trailing text", data + b"garbage"), ("trailing zeros", data + bytes(64))]
    return cases


def test_every_ok_image_of_a_fuzz_run_decodes_in_tensorflow():
    """~380 mutated images: whatever `inspect` calls ok, the bytes a shard stores for it decode with
    tf.io.decode_image; and the run is not vacuous (many ok, many excluded, some Pillow-only)."""
    ok = refused = pillow_only = 0
    for name, data in _mutants():
        status = inspect(data).status
        if status == "ok":
            ok += 1
            assert _tf_decodes(prepare(data).data), (name, len(data))
        else:
            refused += 1
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                pillow_only += not _tf_decodes(data)
            except Exception:  # noqa: BLE001 - Pillow's many ways of refusing
                pass
    assert ok > 80 and refused > 80 and pillow_only > 0, (ok, refused, pillow_only)


def test_symlinks_in_the_dataset_are_listed_never_followed(tmp_path):
    rng = np.random.default_rng(5)
    secret = _png(rng)
    (tmp_path / "secret.png").write_bytes(secret)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "more.png").write_bytes(_png(rng))
    folder = _folder(tmp_path)
    os.symlink(tmp_path / "secret.png", folder / "cat" / "leak.png")
    os.symlink("../../../secret.png", folder / "dog" / "relative_leak.png")
    os.symlink(tmp_path / "outside", folder / "dog" / "linked_dir")
    os.mkfifo(folder / "cat" / "fifo")
    rows = _split(folder, tmp_path)
    for path in ("pets/cat/leak.png", "pets/dog/relative_leak.png", "pets/dog/linked_dir"):
        assert rows[path]["status"].startswith("symbolic link: not followed"), path
        assert rows[path]["bytes"] == 0
    assert rows["pets/cat/fifo"]["status"].startswith("not a regular file")
    digest = hashlib.sha256(secret).hexdigest()
    assert all(r["sha256"] != digest for r in rows.values()), "nothing read from outside the folder"
    assert not any(p.startswith("pets/dog/linked_dir/") for p in rows)


def test_a_class_folder_that_is_a_link_is_refused(tmp_path):
    folder = _folder(tmp_path)
    os.symlink(folder / "cat", folder / "lion")
    with pytest.raises(ValueError, match=r"\['lion'\] are symbolic links"):
        _split(folder, tmp_path)


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    folder = _folder(tmp_path)
    (folder / "zebra").mkdir()
    (folder / "zebra" / ".DS_Store").write_bytes(b"hidden files do not count")
    with pytest.raises(ValueError) as err:
        _split(folder, tmp_path)
    assert "['zebra'] hold no files" in str(err.value) and "cat" not in str(err.value)
    assert not (tmp_path / "manifest.parquet").exists()


def test_imagefolder_download_with_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    source = _folder(tmp_path / "src")
    (source / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"download.path: class folder\(s\) \['zebra'\] under .* hold no files"):
        download(DownloadConfig(dataset="imagefolder", path=str(source)), tmp_path / "raw")
    assert not (tmp_path / "raw" / "imagefolder").exists()


def test_local_imagefolder_links_are_not_followed_and_raw_holds_regular_files_only(tmp_path):
    """A link in the user's source folder is not followed (as split never follows one; issue 30):
    the dataset folder holds regular files only, so split has nothing to follow."""
    source = _folder(tmp_path / "src")
    (tmp_path / "elsewhere.png").write_bytes(_png(np.random.default_rng(9)))
    os.symlink(tmp_path / "elsewhere.png", source / "cat" / "linked.png")
    folder = download(DownloadConfig(dataset="imagefolder", path=str(source)), tmp_path / "raw")
    assert not os.path.lexists(folder / "cat" / "linked.png")
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    assert files and all(stat.S_ISREG(os.lstat(p).st_mode) for p in files)


def test_delayed_link_archive_through_the_download_stage_lands_nothing(tmp_path):
    rng = np.random.default_rng(11)
    (tmp_path / "secret.png").write_bytes(_png(rng))
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in (("pets/cat/a.png", _png(rng)), ("pets/dog/b.png", _png(rng))):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (
            ("pets/cat/leak.png", "p0/p1/../../../../../secret.png"),
            ("pets/cat/p0", "."),
            ("pets/cat/p0/p1", "."),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(UnsafeArchiveError, match=r"'pets/cat/leak.png': symbolic link"):
        download(DownloadConfig(dataset="archive", url=str(archive), sha256=sha), tmp_path / "data" / "raw")
    assert not (tmp_path / "data" / "raw" / "archive").exists()
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.suffix == ".png"]
    assert leftovers == []
