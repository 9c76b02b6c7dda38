"""Download stage: bring a dataset into `data/raw/<dataset>/<class>/<image>` (one folder per class).

The embedded default, `digits`, is scikit-learn's bundled copy of the UCI handwritten digits
(1,797 grayscale 8x8 images, 10 classes). It is written out as PNG files so that it takes the same
split -> shard path as any other image-folder source.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_pipeline.config import DownloadConfig
from resnet_pipeline.fileio import staged_dir

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_digits(dest: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 gray levels -> 0..255, the full 8-bit range.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = dest / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"digit_{index:04d}.png").write_bytes(_png(image))
    return len(pixels)


WRITERS = {"digits": _write_digits}


def download(cfg: DownloadConfig, raw_dir: str | Path) -> Path:
    """Materialise `cfg.dataset` under `raw_dir/<dataset>`; return that folder.

    The folder is built beside its final place and renamed into it, so an interrupted run leaves
    no half-written dataset; a complete one is reused.
    """
    raw_dir = Path(raw_dir)
    dest = raw_dir / cfg.dataset
    if (dest / COMPLETE).exists():
        log.info("download: %s already complete at %s", cfg.dataset, dest)
        return dest
    with staged_dir(dest) as tmp:
        count = WRITERS[cfg.dataset](tmp)
        (tmp / COMPLETE).write_text(f"{count}\n")
    log.info("download: wrote %d images of %s to %s", count, cfg.dataset, dest)
    return dest
