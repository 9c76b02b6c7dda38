"""Every download source end to end on loopback: CIFAR-10 and VOC 2012 archives in their official
layouts over HTTP (with a cut connection and a wrong checksum), archive URLs, and image folders on
disk and on a real S3-compatible server. Each lands as one folder per class that split and shard take."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_pipeline import cli
from resnet_pipeline.config import DownloadConfig, ShardConfig, SplitConfig
from resnet_pipeline.data.download import download
from resnet_pipeline.data.fetch import DownloadError, UnsafeArchiveError
from resnet_pipeline.data.shard import shard
from resnet_pipeline.data.split import split
from tests.data.fakes import voc_expected, write_cifar10_binary_tarball, write_voc2012_tar
from tests.httpserver import LoopbackHTTPServer


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def folder_files(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{c}/{c}_{i}.jpg": jpeg(10 * k + i) for k, c in enumerate(("cat", "dog", "fox")) for i in range(4)}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def classes_of(folder: Path) -> dict[str, int]:
    return {p.name: sum(1 for f in p.iterdir() if f.is_file()) for p in sorted(folder.iterdir()) if p.is_dir()}


def split_and_shard(folder: Path, tmp_path: Path) -> dict:
    split(SplitConfig(min_side=8), 42, folder, tmp_path / "manifest.parquet", tmp_path / "labels.json")
    return shard(ShardConfig(workers=1), tmp_path / "manifest.parquet", folder.parent, tmp_path / "shards")


def test_cifar10_binary_over_http_resumes_a_cut_download(tmp_path):
    data = write_cifar10_binary_tarball(tmp_path / "src.tar.gz", per_batch=10)
    with LoopbackHTTPServer({"/cifar-10-binary.tar.gz": data}) as server:
        server.drop_after["/cifar-10-binary.tar.gz"] = len(data) // 2
        cfg = DownloadConfig(dataset="cifar10", url=server.url("/cifar-10-binary.tar.gz"), md5=md5(data))
        folder = download(cfg, tmp_path / "raw", tmp_path / "downloads")
        ranges = [r for _, r in server.requests]
    assert ranges[0] is None and ranges[-1] == f"bytes={len(data) // 2}-", "the second request resumes"
    assert (tmp_path / "downloads" / "cifar-10-binary.tar.gz").read_bytes() == data
    counts = classes_of(folder)
    assert len(counts) == 10 and sum(counts.values()) == 60
    index = split_and_shard(folder, tmp_path)
    assert sum(v["records"] for v in index["splits"].values()) == 60


def test_wrong_checksum_is_refused_and_the_dataset_already_there_is_kept(tmp_path):
    data = write_cifar10_binary_tarball(tmp_path / "src.tar.gz", per_batch=2)
    existing = tmp_path / "raw" / "cifar10" / "cat"
    existing.mkdir(parents=True)
    (existing / "keep.png").write_bytes(b"what was there")
    with LoopbackHTTPServer({"/c.tar.gz": data}) as server:
        cfg = DownloadConfig(dataset="cifar10", url=server.url("/c.tar.gz"), md5="0" * 32, retries=0)
        with pytest.raises(DownloadError) as err:
            download(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert "md5" in str(err.value) and "0" * 32 in str(err.value) and md5(data) in str(err.value)
    assert (existing / "keep.png").read_bytes() == b"what was there"
    assert not (tmp_path / "downloads" / "c.tar.gz").exists()


@pytest.mark.parametrize("drop_multiclass", [False, True])
def test_voc2012_labels_by_the_largest_object(tmp_path, drop_multiclass):
    data = write_voc2012_tar(tmp_path / "voc.tar")
    expected = voc_expected()
    with LoopbackHTTPServer({"/VOCtrainval_11-May-2012.tar": data}) as server:
        cfg = DownloadConfig(
            dataset="voc2012",
            url=server.url("/VOCtrainval_11-May-2012.tar"),
            md5=md5(data),
            voc_drop_multiclass=drop_multiclass,
        )
        folder = download(cfg, tmp_path / "raw", tmp_path / "downloads")
    got = {f.stem: f.parent.name for f in folder.rglob("*.jpg")}
    keep = {i: label for i, (label, multi) in expected.items() if not (drop_multiclass and multi)}
    assert got == keep


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_url_with_its_sha256_gives_the_image_folder(tmp_path, kind):
    files = folder_files("pets/")  # one top folder, as archives usually have
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, content in files.items():
                zf.writestr(name, content)
        data = buf.getvalue()
    else:
        data = tar_gz(files)
    with LoopbackHTTPServer({f"/pets.{kind}": data}) as server:
        cfg = DownloadConfig(dataset="archive", url=server.url(f"/pets.{kind}"), sha256=sha256(data))
        folder = download(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert classes_of(folder) == {"cat": 4, "dog": 4, "fox": 4}
    assert (folder / "dog" / "dog_2.jpg").read_bytes() == files["pets/dog/dog_2.jpg"]
    assert split_and_shard(folder, tmp_path)["splits"]["train"]["records"] > 0


def test_archive_with_a_member_escaping_is_refused_before_anything_lands(tmp_path):
    files = {**folder_files(), "../../evil.jpg": jpeg(99)}
    data = tar_gz(files)
    with LoopbackHTTPServer({"/bad.tar.gz": data}) as server:
        cfg = DownloadConfig(dataset="archive", url=server.url("/bad.tar.gz"), sha256=sha256(data))
        with pytest.raises(UnsafeArchiveError, match=r"\.\./\.\./evil\.jpg"):
            download(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert not (tmp_path / "raw" / "archive").exists()
    assert not list(tmp_path.rglob("evil.jpg"))


def test_changed_download_params_replace_the_dataset(tmp_path):
    a, b = tar_gz(folder_files()), tar_gz({k: v for k, v in folder_files().items() if not k.startswith("fox")})
    with LoopbackHTTPServer({"/a.tar.gz": a, "/b.tar.gz": b}) as server:
        download(DownloadConfig(dataset="archive", url=server.url("/a.tar.gz"), sha256=sha256(a)), tmp_path / "raw")
        folder = download(
            DownloadConfig(dataset="archive", url=server.url("/b.tar.gz"), sha256=sha256(b)), tmp_path / "raw"
        )
    assert set(classes_of(folder)) == {"cat", "dog"}


def test_imagefolder_from_a_local_path(tmp_path):
    source = tmp_path / "mine"
    for name, content in folder_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    folder = download(DownloadConfig(dataset="imagefolder", path=str(source)), tmp_path / "raw")
    assert classes_of(folder) == {"cat": 4, "dog": 4, "fox": 4}
    assert classes_of(source) == {"cat": 4, "dog": 4, "fox": 4}, "the source is untouched"
    with pytest.raises(FileNotFoundError, match="download.path"):
        download(DownloadConfig(dataset="imagefolder", path=str(tmp_path / "nowhere")), tmp_path / "raw2")


def test_imagefolder_from_s3(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = s3_server.make_bucket("images-source")
    client = s3_server.client()
    files = folder_files()
    for name, content in files.items():
        client.put_object(Bucket=bucket, Key=f"datasets/pets/{name}", Body=content)
    client.put_object(Bucket=bucket, Key="datasets/other/cat/x.jpg", Body=jpeg(5))  # outside the prefix
    cfg = DownloadConfig(
        dataset="imagefolder", path=f"s3://{bucket}/datasets/pets", s3_endpoint_url=s3_server.endpoint_url
    )
    folder = download(cfg, tmp_path / "raw")
    assert classes_of(folder) == {"cat": 4, "dog": 4, "fox": 4}
    assert (folder / "fox" / "fox_1.jpg").read_bytes() == files["fox/fox_1.jpg"]
    with pytest.raises(FileNotFoundError, match="no objects under"):
        download(
            DownloadConfig(dataset="imagefolder", path=f"s3://{bucket}/empty", s3_endpoint_url=s3_server.endpoint_url),
            tmp_path / "raw2",
        )


def test_cli_refuses_a_source_without_its_keys(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        [
            "download",
            "--params",
            str(repo_root / "params.yaml"),
            "--set",
            "download.dataset=archive",
            "--set",
            "download.url=http://127.0.0.1:9/x.tar",
        ]
    )
    assert code == 2
    assert "download.sha256: required for dataset 'archive'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_imagefolder_from_s3_in_parallel_refuses_empty_classes_and_escaping_keys(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = s3_server.make_bucket("images-parallel")
    client = s3_server.client()
    files = {f"c{i % 3}/img_{i:02d}.jpg": jpeg(i) for i in range(40)}
    for name, content in files.items():
        client.put_object(Bucket=bucket, Key=f"many/{name}", Body=content)
    folder = download(
        DownloadConfig(
            dataset="imagefolder", path=f"s3://{bucket}/many", s3_workers=8, s3_endpoint_url=s3_server.endpoint_url
        ),
        tmp_path / "raw",
    )
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.jpg")} == files

    client.put_object(Bucket=bucket, Key="many/zebra/", Body=b"")  # a 'folder' with nothing in it
    with pytest.raises(ValueError, match=r"class folder\(s\) \['zebra'\] under s3://images-parallel/many"):
        download(
            DownloadConfig(dataset="imagefolder", path=f"s3://{bucket}/many", s3_endpoint_url=s3_server.endpoint_url),
            tmp_path / "raw2",
        )
    assert not (tmp_path / "raw2" / "imagefolder").exists()


class _ListingOf:
    """A listing only, as AWS S3 would return for keys with `..` (it stores them as sent). A test
    double because SeaweedFS refuses such keys at PUT, so a real server cannot list one."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def get_paginator(self, name: str):
        assert name == "list_objects_v2"
        return self

    def paginate(self, Bucket: str, Prefix: str):  # noqa: N803 - boto3's spelling
        return [{"Contents": [{"Key": k, "Size": 1} for k in self.keys if k.startswith(Prefix)]}]


@pytest.mark.parametrize("key", ["set/c1/../../../evil.jpg", "set/../evil.jpg", "set//etc/passwd"])
def test_s3_keys_escaping_the_prefix_are_refused_before_any_download(key):
    from resnet_pipeline.data.s3folder import s3_keys as _s3_keys

    with pytest.raises(ValueError, match="escapes the folder"):
        _s3_keys(_ListingOf(["set/c0/a.jpg", key]), "b", "set/", "s3://b/set")


PRIVATE = b"a private file next to the dataset, never to be copied"


def _image_source(root: Path) -> Path:
    source = root / "mine"
    for name, content in folder_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    return source


def _bytes_under(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def _no_hard_links(monkeypatch) -> None:
    """As on another disk: every hard link fails, so files are copied."""

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)


@pytest.mark.parametrize("how", ["hard-link", "copy"])
def test_imagefolder_does_not_follow_links_and_names_them(tmp_path, caplog, monkeypatch, how):
    """Issue 30: a link in an imagefolder source to a private file was hard-linked into data/raw and
    marked ok. Links (to files or folders, inside class folders or beside them) and special files are
    skipped and named in the log, as split names them; the regular images are copied."""
    if how == "copy":
        _no_hard_links(monkeypatch)
    source = _image_source(tmp_path)
    (tmp_path / "private.png").write_bytes(PRIVATE)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "more.jpg").write_bytes(PRIVATE)
    os.symlink(tmp_path / "private.png", source / "cat" / "innocent.jpg")
    os.symlink(tmp_path / "elsewhere", source / "dog" / "extra")
    os.symlink(tmp_path / "private.png", source / "top-level.jpg")
    os.mkfifo(source / "fox" / "pipe.jpg")
    with caplog.at_level(logging.WARNING, logger="resnet_pipeline.data.download"):
        folder = download(DownloadConfig(dataset="imagefolder", path=str(source)), tmp_path / "raw")
    assert classes_of(folder) == {"cat": 4, "dog": 4, "fox": 4}
    assert not any(p.is_symlink() for p in folder.rglob("*"))
    assert PRIVATE not in _bytes_under(tmp_path / "raw"), "no byte of a linked file lands in data/raw"
    log = caplog.text
    for name in ("cat/innocent.jpg", "dog/extra", "top-level.jpg"):
        assert name in log, log
    assert "symbolic link: not followed" in log and "fox/pipe.jpg" in log and "not a regular file" in log, log
    index = split_and_shard(folder, tmp_path)
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert sum(s["records"] for s in index["splits"].values()) == 12


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_imagefolder_class_folder_that_is_a_link_is_refused_naming_it(tmp_path, where):
    """A class folder that is a link (to a folder outside the source, or to another class) is refused
    by name, as split refuses it, before anything is written."""
    source = _image_source(tmp_path)
    if where == "outside":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "more.jpg").write_bytes(PRIVATE)
        os.symlink(tmp_path / "elsewhere", source / "owl")
    else:
        os.symlink("cat", source / "owl")
    with pytest.raises(ValueError, match=r"download.path: class folder\(s\) \['owl'\] under .*mine are symbolic links"):
        download(DownloadConfig(dataset="imagefolder", path=str(source)), tmp_path / "raw")
    assert not (tmp_path / "raw" / "imagefolder").exists()
    assert PRIVATE not in _bytes_under(tmp_path / "raw")


def test_imagefolder_path_that_is_itself_a_link_is_read(tmp_path):
    """download.path is the user's own word: a link there (a dataset on another disk) is followed."""
    source = _image_source(tmp_path)
    os.symlink(source, tmp_path / "pets")
    folder = download(DownloadConfig(dataset="imagefolder", path=str(tmp_path / "pets")), tmp_path / "raw")
    assert classes_of(folder) == {"cat": 4, "dog": 4, "fox": 4}


@pytest.mark.parametrize("how", ["hard-link", "copy"])
def test_an_entry_swapped_for_a_link_after_listing_is_not_followed(tmp_path, monkeypatch, how):
    """The copy itself never follows a link: a file swapped for a link (or a FIFO) between the listing
    and the copy gives nothing at the destination, and never blocks."""
    from resnet_pipeline.data.download import _copy_regular

    if how == "copy":
        _no_hard_links(monkeypatch)
    (tmp_path / "private.png").write_bytes(PRIVATE)
    (tmp_path / "src").mkdir()
    os.symlink(tmp_path / "private.png", tmp_path / "src" / "swapped.jpg")
    os.mkfifo(tmp_path / "src" / "pipe.jpg")
    (tmp_path / "src" / "real.jpg").write_bytes(b"jpeg")
    fd = os.open(tmp_path / "src", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert not _copy_regular("swapped.jpg", fd, tmp_path / "out" / "swapped.jpg")
        assert not _copy_regular("pipe.jpg", fd, tmp_path / "out" / "pipe.jpg")
        assert _copy_regular("real.jpg", fd, tmp_path / "out" / "real.jpg")
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path / "out")) == ["real.jpg"]
    assert (tmp_path / "out" / "real.jpg").read_bytes() == b"jpeg"
