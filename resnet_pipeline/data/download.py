"""Download stage: bring a dataset into `data/raw/<dataset>/<class>/<image>` (one folder per class).

Sources (`download.dataset` in params):

- `digits`: the embedded default, scikit-learn's bundled copy of the UCI handwritten digits (1,797
  grayscale 8x8 images, 10 classes), written out as PNG files.
- `cifar10`: the official binary tarball (never the pickled Python one: unpickling a downloaded
  file runs code), md5-checked, one PNG per image.
- `voc2012`: the official trainval tar, md5-checked; one label per image, the class of its largest
  object (`voc_drop_multiclass` drops images whose objects span several classes).
- `imagefolder`: a local folder or `s3://bucket/prefix` with one sub-folder per class.
- `archive`: a `.tar`, `.tar.gz` or `.zip` at a URL, with its sha256, holding such a folder.

Archives are fetched into `data/downloads/` (resumable, retried, verified before use) and
extracted with every member checked first. The dataset folder is built beside its final place and
renamed into it, so an interrupted run leaves no half-written dataset; a complete one made from
the same download params is reused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from resnet_pipeline.config import DownloadConfig
from resnet_pipeline.data import s3folder
from resnet_pipeline.data.archive import ArchiveLimits, safe_extract
from resnet_pipeline.data.fetch import DownloadLimits, fetch
from resnet_pipeline.data.images import png_bytes
from resnet_pipeline.fileio import staged_dir
from resnet_pipeline.redact import redact_values

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def _write_digits(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 gray levels -> 0..255, the full 8-bit range.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = dest / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"digit_{index:04d}.png").write_bytes(png_bytes(image))
    return len(pixels)


def _fetch_archive(cfg: DownloadConfig, downloads: Path, url: str, md5: str | None) -> Path:
    name = Path(urlparse(url).path).name or "archive"
    downloads.mkdir(parents=True, exist_ok=True)
    limits = DownloadLimits(int(cfg.max_download_gb * 2**30), cfg.max_download_seconds, cfg.min_download_kb_s * 1024)
    return fetch(url, downloads / name, sha256=cfg.sha256, md5=md5, retries=cfg.retries, limits=limits)


def _limits(cfg: DownloadConfig) -> ArchiveLimits:
    return ArchiveLimits(cfg.max_members, int(cfg.max_extract_gb * 2**30), cfg.max_ratio)


def _count(dest: Path) -> int:
    return sum(1 for p in dest.rglob("*") if p.is_file() and p.name != COMPLETE)


def _write_cifar10(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    from resnet_pipeline.data import formats

    archive = _fetch_archive(cfg, downloads, cfg.url or formats.CIFAR10_URL, cfg.md5 or formats.CIFAR10_MD5)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract.") as extracted:
        safe_extract(archive, extracted, limits=_limits(cfg))
        return formats.cifar10_binary_to_folder(Path(extracted), dest)


def _voc_member(name: str) -> bool:
    parts = name.split("/")
    return any(p in ("JPEGImages", "Annotations") for p in parts) or "/".join(parts[-3:-1]) == "ImageSets/Main"


def _write_voc2012(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    from resnet_pipeline.data import formats

    archive = _fetch_archive(cfg, downloads, cfg.url or formats.VOC2012_URL, cfg.md5 or formats.VOC2012_MD5)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract.") as extracted:
        safe_extract(archive, extracted, select=_voc_member, limits=_limits(cfg))
        summary = formats.voc_to_folder(Path(extracted), dest, drop_multiclass=cfg.voc_drop_multiclass)
    log.info("download: voc2012 %s", summary)
    return summary["images"]


def _image_folder_root(folder: Path) -> Path:
    """Descend through folders that hold a single folder and nothing else (an archive's top folder);
    never through a link."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
            folder = entries[0]
        else:
            return folder


def _refuse_empty_classes(where: str, classes: dict[str, int]) -> None:
    """An empty class folder would silently give a model with one class fewer: refuse it by name."""
    empty = sorted(name for name, count in classes.items() if count == 0)
    if empty:
        raise ValueError(
            f"download.path: class folder(s) {empty} under {where} hold no files; "
            "remove them or add images (every class folder becomes a class)"
        )


def _move_tree(src: Path, dest: Path) -> None:
    for entry in src.iterdir():
        shutil.move(str(entry), str(dest / entry.name))


def _write_archive(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    assert cfg.url is not None  # config requires download.url for dataset 'archive'
    archive = _fetch_archive(cfg, downloads, cfg.url, cfg.md5)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract.") as extracted:
        safe_extract(archive, extracted, limits=_limits(cfg))
        _move_tree(_image_folder_root(Path(extracted)), dest)
    return _count(dest)


# the reasons split records for the same entries (data/split.py)
NOT_FOLLOWED = "symbolic link: not followed (links may point out of the dataset)"
NOT_REGULAR = "not a regular file: a device, FIFO or socket"
CHANGED = "changed while copied: no longer a regular file (not followed)"
SHOWN = 10  # skipped entries named per reason in the warning (all of them at debug level)


def _copy_regular(name: str, dir_fd: int, dst: Path) -> bool:
    """Hard-link (else copy) the regular file `name` of the folder open as `dir_fd` to `dst`, never
    through a link; False, with nothing left at `dst`, if it is no longer a regular file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(name, dst, src_dir_fd=dir_fd, follow_symlinks=False)  # a link would be linked as a link
    except OSError:
        pass
    else:
        if stat.S_ISREG(os.lstat(dst).st_mode):
            return True
        dst.unlink()
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return False
        raise
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            return False
        with open(dst, "xb") as out:
            shutil.copyfileobj(src, out)
    return True


def _log_skipped(source: Path, skipped: dict[str, list[str]]) -> None:
    for reason, names in sorted(skipped.items()):
        more = f" and {len(names) - SHOWN} more (all with -v)" if len(names) > SHOWN else ""
        advice = "; copy the files in (cp -L) to include them" if reason == NOT_FOLLOWED else ""
        log.warning(
            "download: skipped %d entries of %s: %s: %s%s%s", len(names), source, reason, names[:SHOWN], more, advice
        )
        for name in names:
            log.debug("download: skipped %s: %s", source / name, reason)


def _write_imagefolder(cfg: DownloadConfig, dest: Path, downloads: Path) -> int:
    """Copy (hard-link where possible) the regular files of a local folder, or fetch an s3:// one.

    Links are never followed, as split never follows them: a class folder that is a link is refused
    by name; a link anywhere else (to a file or a folder, inside the source or out of it) and a
    device, FIFO or socket is skipped and named in a warning. The folder is walked with open folder
    descriptors (`os.fwalk`), so a folder swapped for a link while it is read is not followed either.
    """
    assert cfg.path is not None  # config requires download.path for dataset 'imagefolder'
    if cfg.path.startswith("s3://"):
        return _download_s3_folder(cfg.path, dest, cfg.s3_endpoint_url, cfg.s3_workers, cfg.retries)
    source = Path(cfg.path).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"download.path: {source} is not a folder; expected one sub-folder per class")
    entries = sorted(p for p in source.iterdir() if not p.name.startswith("."))
    linked = [p.name for p in entries if p.is_symlink() and p.is_dir()]
    if linked:
        raise ValueError(
            f"download.path: class folder(s) {linked} under {source} are symbolic links, which are not "
            "followed (links may point out of the dataset); copy the images in instead"
        )
    classes = {p.name: 0 for p in entries if p.is_dir() and not p.is_symlink()}
    skipped: dict[str, list[str]] = {}
    root = os.path.realpath(source)  # download.path itself is the user's word, a link or not
    for here, dirs, files, dir_fd in os.fwalk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            relative = Path(here, name).relative_to(root)
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                continue  # fwalk descends into it
            reason = NOT_FOLLOWED if stat.S_ISLNK(mode) else None if stat.S_ISREG(mode) else NOT_REGULAR
            if reason is None and not _copy_regular(name, dir_fd, dest / relative):
                reason = CHANGED
            if reason:
                skipped.setdefault(reason, []).append(relative.as_posix())
            elif len(relative.parts) > 1 and relative.parts[0] in classes:
                classes[relative.parts[0]] += 1
    _log_skipped(source, skipped)
    _refuse_empty_classes(str(source), classes)
    return _count(dest)


def _download_s3_folder(url: str, dest: Path, endpoint_url: str | None, workers: int = 16, retries: int = 5) -> int:
    """Every object under s3://bucket/prefix/ into dest, `workers` requests at a time (data/s3folder.py);
    every key is checked and no class folder may be empty before the first object is fetched."""
    folder = s3folder.list_folder(url, endpoint_url, workers)
    if not folder.objects:
        raise FileNotFoundError(f"download.path: no objects under {url}; expected one sub-folder per class")
    _refuse_empty_classes(url, folder.classes)
    return s3folder.fetch_folder(folder, dest, workers, retries=retries)


_NOT_CONTENT = (
    "retries",
    "s3_workers",
    "max_members",
    "max_extract_gb",
    "max_ratio",
    "max_download_gb",
    "max_download_seconds",
    "min_download_kb_s",
)

WRITERS = {
    "digits": _write_digits,
    "cifar10": _write_cifar10,
    "voc2012": _write_voc2012,
    "imagefolder": _write_imagefolder,
    "archive": _write_archive,
}


def _source_id(cfg: DownloadConfig) -> dict:
    """What decides the dataset's content (not retries, parallelism or the archive limits), URLs
    redacted: a presigned URL's signature changes with every signing, while the archive it names
    is pinned by its checksum."""
    return redact_values({k: v for k, v in asdict(cfg).items() if k not in _NOT_CONTENT})


def download(cfg: DownloadConfig, raw_dir: str | Path, downloads_dir: str | Path | None = None) -> Path:
    """Materialise `cfg.dataset` under `raw_dir/<dataset>`; return that folder.

    `downloads_dir` (default: `raw_dir/../downloads`) keeps fetched archives, partial ones included,
    so that a cut download resumes.
    """
    raw_dir = Path(raw_dir)
    downloads = Path(downloads_dir) if downloads_dir else raw_dir.parent / "downloads"
    dest = raw_dir / cfg.dataset
    marker = dest / COMPLETE
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = None
        if isinstance(done, dict) and done.get("source") == _source_id(cfg):
            log.info("download: %s already complete at %s", cfg.dataset, dest)
            return dest
    with staged_dir(dest) as tmp:
        count = WRITERS[cfg.dataset](cfg, tmp, downloads)
        marker_data = {"source": _source_id(cfg), "files": count}
        (tmp / COMPLETE).write_text(json.dumps(marker_data, sort_keys=True) + "\n")
    log.info("download: wrote %d files of %s to %s", count, cfg.dataset, dest)
    return dest
